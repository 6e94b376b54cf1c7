"""Training randomness as a pure function of (seed, epoch): what makes a resumed run exact.

A run killed mid-epoch continues from the checkpoint written at the end of the previous epoch and
redoes the interrupted epoch. That epoch then draws exactly what it drew the first time because
nothing it uses depends on what came before it:

- the order of the training samples: :class:`EpochSampler`, seeded by (seed, epoch);
- each sample's augmentation: the dataset re-seeds the albumentations pipeline with
  (seed, epoch, index) for every sample, so it is the same whatever the number of DataLoader
  workers and whether they persist across epochs;
- torch / numpy / python global generators (dropout, stochastic depth): re-seeded with
  (seed, epoch) at the start of every training epoch by :class:`finetune.train.checkpoints.EpochSeeding`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


def derived_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integers (seed, epoch[, index])."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` pairs: a permutation of ``range(n)`` or, with `weights`, `n`
    weighted draws with replacement, both a function of (seed, epoch) alone.

    Lightning calls :meth:`set_epoch` before every training epoch (also through its
    distributed wrapper). The epoch travels with each index so that a dataset in a persistent
    worker process knows which epoch it is serving.
    """

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None):
        self.n = n
        self.seed = seed
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights.double(), self.n, replacement=True, generator=generator)
        epoch = self.epoch
        return ((epoch, i) for i in order.tolist())


class RankShare(DistributedSampler):
    """One DDP rank's share of `sampler`'s epoch order: positions ``rank, rank + replicas, ...``
    (padded from the start to a multiple of `replicas`, as ``DistributedSampler`` pads). Global step
    k of `replicas` ranks with batch B then trains on exactly the images of batch k of one process
    with batch ``replicas x B``. Being a ``DistributedSampler``, Lightning does not wrap it in its
    own, which would shuffle the order once more."""

    def __init__(self, sampler: EpochSampler, replicas: int, rank: int):
        super().__init__(range(len(sampler)), num_replicas=replicas, rank=rank, shuffle=False, drop_last=False)
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.sampler)
        order = (order * -(-self.total_size // len(order)))[: self.total_size]
        return iter(order[self.rank : self.total_size : self.num_replicas])


class ChunkOrder(EpochSampler):
    """Like :class:`EpochSampler` without weights, for rows stored in chunks (streamed shards,
    `stored`: the rows each chunk holds): the chunks in a permutation, then each chunk's rows in a
    permutation, both functions of (seed, epoch). One process reads each chunk once per epoch
    instead of all of them for every batch."""

    def __init__(self, stored: list[list[int]], seed: int):
        super().__init__(sum(map(len, stored)), seed)
        self.stored = [list(rows) for rows in stored]

    def chunks(self) -> list[list[int]]:
        """This epoch's order, chunk by chunk."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.stored), generator=generator).tolist()
        return [
            [self.stored[c][i] for i in torch.randperm(len(self.stored[c]), generator=generator).tolist()]
            for c in order
        ]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for chunk in self.chunks() for i in chunk)


class ShardShare(RankShare):
    """One DDP rank's share of a :class:`ChunkOrder`: whole chunks, dealt in the epoch's chunk
    order to the rank holding the fewest rows so far, so each rank reads its own chunks. Ranks
    must take equal numbers of steps: a shorter share repeats its own first rows up to the longest
    (as ``DistributedSampler`` pads). Unlike :class:`RankShare`, the result depends on the number of
    ranks (no rank reads another's chunks)."""

    def _shares(self) -> list[list[int]]:
        shares = [[] for _ in range(self.num_replicas)]
        for chunk in self.sampler.chunks():
            min(shares, key=len).extend(chunk)
        longest = max(len(s) for s in shares)
        return [(s * -(-longest // max(len(s), 1)))[:longest] if s else shares[0][:longest] for s in shares]

    def __len__(self) -> int:
        return len(self._shares()[self.rank])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self._shares()[self.rank])
