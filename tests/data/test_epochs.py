"""The training order as a function of (seed, epoch), and its shares under DDP."""

from __future__ import annotations

import pytest

from finetune.data.epochs import EpochSampler, RankShare


@pytest.mark.parametrize("n, replicas", [(24, 2), (10, 4), (3, 4)])
def test_ranks_deal_out_one_processs_order_round_robin(n, replicas):
    # Global step k of `replicas` ranks with batch B = batch k of one process with batch replicas x B.
    for epoch in (0, 3):
        single = EpochSampler(n, seed=7)
        single.set_epoch(epoch)
        shares = []
        for rank in range(replicas):
            share = RankShare(EpochSampler(n, seed=7), replicas, rank)
            share.set_epoch(epoch)  # as Lightning calls it: reaches the order inside
            shares.append(list(share))
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(RankShare(EpochSampler(n, 7), replicas, 0))
        interleaved = [shares[i % replicas][i // replicas] for i in range(replicas * len(shares[0]))]
        order = list(single)
        assert interleaved[:n] == order  # every image once, in the single process's order
        assert interleaved[n:] == (order * replicas)[: len(interleaved) - n]  # padding repeats the start
        assert all(e == epoch for s in shares for e, _ in s)


def test_a_share_is_a_distributed_sampler_lightning_leaves_alone():
    from torch.utils.data import DistributedSampler

    assert isinstance(RankShare(EpochSampler(4, 0), 2, 1), DistributedSampler)
