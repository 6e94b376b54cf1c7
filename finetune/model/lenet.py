"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998), from scratch, as a backbone (``backbone=lenet5``).

As in the paper: a 32×32 input; C1 (6 maps, 5×5), S2 (2×2 subsampling), C3 (16 maps, 5×5, each
reading only the subset of S2's maps of the paper's Table I), S4, C5 (120 maps, 5×5: 1×1 at a
32×32 input, so a fully connected layer in effect), F6 (84 units). Subsampling sums a 2×2
window, multiplies it by a trainable coefficient and adds a trainable bias, per map; every
layer is followed by the paper's scaled tanh, 1.7159·tanh(2/3·a); weights start uniform in
±2.4 / fan-in. The pooled features are F6's 84 activations: the paper's RBF output layer is
what our head replaces.

Not from the paper: the input. Our pipelines make normalized 3-channel RGB tensors, so the
model turns them into one gray channel itself (fixed ITU-R BT.601 luma weights, not trained),
and C1 has the paper's 1 input channel and 156 parameters. The data config normalizes each
channel with mean 0.5 and std 0.5 (pixels in [-1, 1]; the paper used [-0.1, 1.175]): with the
same statistics on all channels, gray(normalize(x)) = normalize(gray(x)). Inputs larger than
32×32 work: C5's map is then averaged over positions. There are no pretrained weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from finetune.model.groups import LayerGroup

NUM_FEATURES = 84
MIN_INPUT_SIZE = 32  # below it C5 has nothing left to convolve
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
}
LUMA = (0.299, 0.587, 0.114)

# Table I of the paper: the S2 maps (0-5) each C3 map (0-15) reads. Maps 0-5 read three
# neighbouring maps, 6-11 four neighbouring, 12-14 four non-neighbouring, 15 all six: 60 links,
# "to break the symmetry in the network" and keep the connection count reasonable.
C3_TABLE = (
    [[(j + i) % 6 for i in range(3)] for j in range(6)]
    + [[(j + i) % 6 for i in range(4)] for j in range(6)]
    + [[0, 1, 3, 4], [1, 2, 4, 5], [0, 2, 3, 5]]
    + [list(range(6))]
)


class ScaledTanh(nn.Module):
    """f(a) = A·tanh(S·a) with A = 1.7159, S = 2/3: f(±1) = ±1, maximal gain near the origin."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


class Subsampling(nn.Module):
    """S2/S4: each unit sums a 2×2 window (stride 2) of one map, times that map's trainable
    coefficient, plus its trainable bias (2 parameters per map)."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.AvgPool2d(2)  # an nn.AvgPool2d so that receptive-field arithmetic sees it
        self.weight = nn.Parameter(torch.full((channels,), 1.0))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return 4 * self.pool(x) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class TableConv2d(nn.Conv2d):
    """A convolution in which output map j reads only the input maps ``table[j]``. The weight
    tensor keeps every (out, in) kernel; the unconnected ones are zero and stay zero (a fixed
    mask multiplies them out of the forward pass, so they get no gradient). For C3 that is
    1,516 trainable parameters, as in the paper, in a 2,416-element tensor."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, table: list[list[int]]):
        super().__init__(in_channels, out_channels, kernel_size)
        mask = torch.zeros(out_channels, in_channels, 1, 1)
        for out, inputs in enumerate(table):
            mask[out, inputs] = 1.0
        self.register_buffer("mask", mask, persistent=False)  # architecture, not state

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class LeNet5(nn.Module):
    """RGB (N, 3, H, W) normalized as :data:`DATA_CONFIG` says -> F6 features (N, 84)."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.c1 = nn.Conv2d(1, 6, 5)
        self.s2 = Subsampling(6)
        self.c3 = TableConv2d(6, 16, 5, C3_TABLE)
        self.s4 = Subsampling(16)
        self.c5 = nn.Conv2d(16, 120, 5)
        self.f6 = nn.Linear(120, NUM_FEATURES)
        self.act = ScaledTanh()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights uniform in ±2.4 / fan-in (the paper's), fan-in counting only connected inputs;
        biases zero; subsampling coefficients 1 (a plain 2×2 sum)."""
        for layer in (self.c1, self.c3, self.c5, self.f6):
            weight = layer.weight
            connected = layer.mask.expand_as(weight) if isinstance(layer, TableConv2d) else torch.ones_like(weight)
            fan_in = connected.flatten(1).sum(1).view(-1, *[1] * (weight.ndim - 1))
            bound = 2.4 / fan_in
            weight.copy_((torch.rand_like(weight) * 2 - 1) * bound * connected)
            layer.bias.zero_()
        for layer in (self.s2, self.s4):
            layer.weight.fill_(1.0)
            layer.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = (x * self.luma).sum(dim=1, keepdim=True)
        x = self.act(self.s2(self.act(self.c1(x))))
        x = self.act(self.s4(self.act(self.c3(x))))
        x = self.act(self.c5(x)).mean(dim=(2, 3))  # 1×1 at 32×32: the mean is the identity
        return self.act(self.f6(x))


def lenet_groups(model: LeNet5) -> list[LayerGroup]:
    """One group per layer of the paper: c1, s2, c3, s4, c5, f6."""
    return [
        LayerGroup(name, tuple(f"{name}.{p}" for p, _ in getattr(model, name).named_parameters()))
        for name in ("c1", "s2", "c3", "s4", "c5", "f6")
    ]
