"""Resumable, rank-sharded data loading for the map-style window datasets of ``supra.data``."""

import warnings
from typing import Any, Dict, Iterator, List, Optional, Sized

import numpy as np
import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


class _EpochIterator(Iterator[int]):
    """One pass of a ``ShardedSampler``; records its progress in the sampler while it is current."""

    def __init__(self, sampler: "ShardedSampler"):
        self.sampler = sampler
        self.epoch = sampler.epoch
        self.position = sampler._resume_at
        sampler._resume_at = 0
        sampler._yielded = self.position
        sampler._current = self
        self.order = sampler.order(self.epoch)
        self.done = False

    def __next__(self) -> int:
        if self.position >= len(self.order):
            # The pass is over: the next one reshuffles with the next epoch's seed.
            if not self.done and self.sampler._current is self:
                self.sampler.epoch = self.epoch + 1
                self.sampler._yielded = 0
            self.done = True
            raise StopIteration
        index = int(self.order[self.position])
        self.position += 1
        if self.sampler._current is self:
            self.sampler._yielded = self.position
        return index


class ShardedSampler(Sampler[int]):
    """This rank's share of a per-epoch permutation of ``range(num_samples)``; stateful.

    Each epoch draws ``torch.randperm(num_samples)`` from a generator seeded with ``seed + epoch``
    (the same on every rank), keeps the first ``world_size * (num_samples // world_size)`` indices
    and gives rank ``r`` every ``world_size``-th one from ``r``: ranks see disjoint windows and the
    same number of them. A completed pass advances ``epoch``, so iterating again reshuffles.
    ``state_dict()`` holds the epoch and the position within it; ``StatefulDataLoader`` saves it
    with its own state.

    Args:
        num_samples: dataset length.
        rank, world_size: this rank and the number of ranks.
        shuffle: permute each epoch (else the rank's share of ``range(num_samples)`` in order).
        seed: base seed of the permutations.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot give one to each of {world_size} ranks")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._resume_at = 0
        self._yielded = 0
        self._current: Optional[_EpochIterator] = None

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in order (int64 array)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.num_samples, generator=generator)
        else:
            indices = torch.arange(self.num_samples)
        return indices[: len(self) * self.world_size][self.rank :: self.world_size].numpy()

    def __iter__(self) -> Iterator[int]:
        return _EpochIterator(self)

    def set_epoch(self, epoch: int) -> None:
        """Starts the next pass at ``epoch``. Setting the current epoch keeps a resumed position, so
        a training loop may call ``set_epoch(epoch)`` before every pass, resumed or not."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_at = 0
            self._yielded = 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        if not {"epoch", "yielded"} <= state_dict.keys() or not 0 <= state_dict["yielded"] <= len(self):
            raise ValueError(
                f"sampler state {state_dict} needs 'epoch' and 'yielded' in [0, {len(self)}]; was it saved "
                f"for a dataset of another size or another world_size?"
            )
        self.epoch = int(state_dict["epoch"])
        self._resume_at = int(state_dict["yielded"])
        self._yielded = self._resume_at


def collate_windows(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stacks item dicts into a batch dict of [B, seq_len] tensors."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def build_dataloader(
    dataset: Sized,
    *,
    batch_size: int,
    seq_len: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """A resumable loader over this rank's share of a map-style window dataset.

    Batches are ``{"tokens", "labels", "positions"}``, LongTensors [batch_size, seq_len]. Iterating
    the loader gives one epoch; the next iteration reshuffles (seed + epoch). ``state_dict()`` /
    ``load_state_dict()`` restore the exact position (epoch and step, with any ``num_workers``): a
    loader restored from a state yields the batches the saved one would have yielded next. Use
    ``InfiniteLoader`` to run across epochs by steps.

    Args:
        dataset: map-style dataset of item dicts (``TokenShardDataset``, ``OpenLMWebDataset``,
            ``TextDataset``).
        batch_size: windows per batch on each rank.
        seq_len: if given, checked against the dataset's.
        rank, world_size: this rank and the number of ranks (ranks get disjoint windows).
        seed: shuffling seed (use the same on every rank).
        shuffle: reshuffle every epoch.
        num_workers: loader worker processes.
        drop_last: drop each epoch's last partial batch.
        pin_memory: pin batches in page-locked memory (for asynchronous copies to the GPU).

    Returns:
        A ``torchdata`` ``StatefulDataLoader`` whose ``sampler`` is a ``ShardedSampler``.

    Raises:
        ValueError: bad sizes, a seq_len mismatch, or a dataset with fewer windows than
            ``world_size * batch_size`` (``world_size`` without ``drop_last``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    num_windows = len(dataset)
    needed = world_size * batch_size if drop_last else world_size
    if num_windows < needed:
        raise ValueError(
            f"the dataset has {num_windows} windows, but a batch of {batch_size} on each of {world_size} "
            f"rank(s) needs {needed}{'' if drop_last else ' (one per rank without drop_last)'}; use more "
            f"data, a smaller batch_size or a shorter seq_len"
        )
    if seq_len is not None:
        found = getattr(dataset, "seq_len", None)
        if found is None:
            found = dataset[0]["tokens"].shape[-1]
        if found != seq_len:
            raise ValueError(f"the dataset yields windows of seq_len {found}, but seq_len={seq_len} was asked for")
    sampler = ShardedSampler(num_windows, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in recent torch; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*set_vital.*deprecated")
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_windows,
            drop_last=drop_last,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
        )


class InfiniteLoader:
    """Iterates a loader forever, one epoch after another, with a resumable state.

    Args:
        loader: a loader from ``build_dataloader`` (any ``StatefulDataLoader`` whose passes are
            epochs).

    Attributes:
        epoch: passes completed so far.
    """

    def __init__(self, loader: StatefulDataLoader):
        self.loader = loader
        self.epoch = 0
        self._iterator: Optional[Iterator[Any]] = None

    def __iter__(self) -> "InfiniteLoader":
        return self

    def __next__(self) -> Any:
        # A state saved after an epoch's last batch resumes with an empty pass: allow one.
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
        raise ValueError("the loader yields no batches")

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.epoch = int(state_dict["epoch"])
        self.loader.load_state_dict(state_dict["loader"])
        self._iterator = None


def cu_seqlens_from_positions(positions: torch.Tensor) -> torch.Tensor:
    """Cumulative segment boundaries of packed documents, over the flattened batch.

    A segment starts at every 0 in ``positions`` and at the start of every row. No host sync.

    Args:
        positions: integer tensor [B, T].

    Returns:
        int32 tensor [num_segments + 1] on ``positions.device``: the segment start offsets in the
        flattened ``B * T`` tokens, then ``B * T``.

    Example:
        positions ``[[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]]`` gives ``[0, 3, 5, 7, 10]``.
    """
    if positions.dim() != 2:
        raise ValueError(f"positions must be [B, T], got shape {tuple(positions.shape)}")
    starts = positions == 0
    starts[:, 0] = True
    offsets = starts.reshape(-1).nonzero().squeeze(1)
    total = torch.full((1,), positions.numel(), dtype=offsets.dtype, device=positions.device)
    return torch.cat([offsets, total]).to(torch.int32)
