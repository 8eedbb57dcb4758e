"""build_dataloader: rank sharding, exact resume (mid-epoch, across epochs, with workers), errors."""

import numpy as np
import pytest
import torch

from supra.data import InfiniteLoader, TokenShardDataset, build_dataloader, cu_seqlens_from_positions, write_token_shards

SEQ_LEN = 7


@pytest.fixture
def dataset(tmp_path):
    """Windows over the stream 0, 1, 2, ...: window i's first token is i * (SEQ_LEN + 1)."""
    out = write_token_shards([np.arange(45 * (SEQ_LEN + 1) + 3)], tmp_path / "ds", vocab_size=1000, shard_tokens=50)
    return TokenShardDataset(out, SEQ_LEN)


def window_ids(batch):
    return (batch["tokens"][:, 0] // (SEQ_LEN + 1)).tolist()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_and_rank_sharding(dataset):
    assert len(dataset) == 45
    seen = []
    for rank in range(3):
        loader = build_dataloader(dataset, batch_size=4, seq_len=SEQ_LEN, rank=rank, world_size=3, seed=5)
        assert len(loader) == 3
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:
            assert set(batch) == {"tokens", "labels", "positions"}
            assert batch["tokens"].shape == (4, SEQ_LEN) and batch["tokens"].dtype == torch.long
            ids = window_ids(batch)
            for row, i in enumerate(ids):
                base = i * (SEQ_LEN + 1)
                assert batch["tokens"][row].tolist() == list(range(base, base + SEQ_LEN))
                assert batch["labels"][row].tolist() == list(range(base + 1, base + SEQ_LEN + 1))
            seen += ids
    # 3 ranks x 15 windows each; batches use 12 of each rank's 15 (drop_last): all distinct.
    assert len(seen) == len(set(seen)) == 36


def test_epochs_reshuffle_deterministically(dataset):
    first = build_dataloader(dataset, batch_size=5, seed=1)
    second = build_dataloader(dataset, batch_size=5, seed=1)
    epochs_a = [sum((window_ids(b) for b in first), []) for _ in range(3)]
    epochs_b = [sum((window_ids(b) for b in second), []) for _ in range(3)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]
    assert sorted(epochs_a[0]) == sorted(epochs_a[1]) == list(range(45))
    in_order = build_dataloader(dataset, batch_size=5, shuffle=False)
    assert sum((window_ids(b) for b in in_order), []) == list(range(45))
    other_seed = build_dataloader(dataset, batch_size=5, seed=2)
    assert sum((window_ids(b) for b in other_seed), []) != epochs_a[0]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 5, 6, 13])
@pytest.mark.parametrize("world_size, batch_size", [(2, 4), (3, 5)])
def test_resume_yields_the_same_next_batches(dataset, num_workers, stop_after, world_size, batch_size):
    # 45 windows; world 2: 22 per rank, batch 4, 5 batches per epoch (2 windows dropped);
    # world 3: 15 per rank, batch 5, exactly 3 batches per epoch (stops 3 and 6 end an epoch).
    def make():
        loader = build_dataloader(
            dataset, batch_size=batch_size, rank=1, world_size=world_size, seed=3, num_workers=num_workers
        )
        return InfiniteLoader(loader)

    reference = make()
    expected = [window_ids(b) for b in take(reference, stop_after + 12)]

    running = make()
    take(running, stop_after)
    state = running.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    got = [window_ids(b) for b in take(resumed, 12)]
    assert got == expected[stop_after:]
    assert resumed.epoch == reference.epoch


def test_resume_a_plain_loader_per_epoch_loop(dataset):
    """The recipe-style loop: `for epoch ...: sampler.set_epoch(epoch); for batch in loader`."""

    def run(loader, start_epoch, epochs, stop_at=None):
        out = []
        for epoch in range(start_epoch, epochs):
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                out.append(window_ids(batch))
                if stop_at is not None and len(out) == stop_at:
                    return out, loader.state_dict(), epoch
        return out, None, None

    expected, _, _ = run(build_dataloader(dataset, batch_size=6, seed=9), 0, 3)
    assert len(expected) == 21
    for stop_at in (4, 7, 10):
        head, state, epoch = run(build_dataloader(dataset, batch_size=6, seed=9), 0, 3, stop_at)
        resumed = build_dataloader(dataset, batch_size=6, seed=9)
        resumed.load_state_dict(state)
        tail, _, _ = run(resumed, epoch, 3)
        assert head + tail == expected


def test_size_errors(dataset):
    with pytest.raises(ValueError, match="45 windows, but a batch of 12 on each of 4 rank.* needs 48"):
        build_dataloader(dataset, batch_size=12, world_size=4)
    assert len(build_dataloader(dataset, batch_size=12, world_size=4, drop_last=False)) == 1
    with pytest.raises(ValueError, match="seq_len 7, but seq_len=8"):
        build_dataloader(dataset, batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        build_dataloader(dataset, batch_size=2, rank=2, world_size=2)


def test_cu_seqlens_hand_example():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [4, 5, 0, 0, 1, 2, 0]])
    cu_seqlens = cu_seqlens_from_positions(positions)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 7, 9, 10, 13, 14]
    assert cu_seqlens_from_positions(torch.arange(5).expand(2, 5)).tolist() == [0, 5, 10]
    with pytest.raises(ValueError, match="\\[B, T\\]"):
        cu_seqlens_from_positions(torch.arange(5))
