"""What the trainer consumes: ``Batch`` (inputs, targets, loss mask) and the ``Dataset`` protocol.

A dataset decides the order of its examples per epoch (``epoch_batches``) and how a list of example
ids becomes arrays (``collate``). Micro-batch ``k`` of a run is a pure function of ``k``, the seed
and the world size (``micro_batch``), so resuming at step ``s`` needs no saved iterator: it recomputes
the position from ``s``. Each process of a distributed run takes every ``world``-th example of the
same global batch, so N processes see exactly the examples one process with an N× batch sees.
No mlx here: batches are numpy until the trainer moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mlx_med.errors import UserError


@dataclass
class Batch:
    inputs: np.ndarray  # (b, L) int32
    targets: np.ndarray  # (b, L) int32, inputs shifted by one
    mask: np.ndarray  # (b, L) float32, 1 where the target counts in the loss
    input_tokens: int = 0  # real (non-padding) input positions, the compute actually spent

    @property
    def tokens(self) -> int:
        """Loss-bearing tokens (the unit of tokens/s)."""
        return int(self.mask.sum())


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def epoch_batches(self, epoch: int, global_batch: int) -> list[np.ndarray]:
        """Example ids of each global batch of ``epoch`` (deterministic given the seed)."""

    def collate(self, ids: np.ndarray) -> Batch: ...


class BatchSchedule:
    """Maps a run's micro-batch counter to this process's share of a global batch."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.global_batch = batch_size * world
        self._epoch: int | None = None
        self._batches: list[np.ndarray] = []
        if not self.batches_in_epoch(0):
            raise UserError(
                f"{len(dataset)} training examples cannot fill one global batch of {self.global_batch}"
                f" (batch size {batch_size} × {world} process(es)); lower the batch size or add data")

    def batches_in_epoch(self, epoch: int) -> list[np.ndarray]:
        if self._epoch != epoch:
            self._batches = self.dataset.epoch_batches(epoch, self.global_batch)
            self._epoch = epoch
        return self._batches

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of micro-batch ``k`` (0-based)."""
        per_epoch = len(self.batches_in_epoch(0))
        return divmod(k, per_epoch)

    def micro_batch(self, k: int) -> Batch:
        epoch, index = self.position(k)
        ids = self.batches_in_epoch(epoch)[index]
        return self.dataset.collate(ids[self.rank :: self.world])


def pad_sequences(seqs: list[np.ndarray], masks: list[np.ndarray], multiple: int = 8) -> Batch:
    """Right-pad token sequences (each with its own per-token loss mask) into one shifted batch.

    ``masks[i][j]`` says whether token j of sequence i is a loss target. Width is the longest
    sequence minus one, rounded up to ``multiple`` (fewer distinct shapes → fewer recompilations).
    """
    width = max(len(s) for s in seqs) - 1
    width = -(-width // multiple) * multiple
    n = len(seqs)
    inputs = np.zeros((n, width), np.int32)
    targets = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.float32)
    lengths = [len(seq) - 1 for seq in seqs]
    for i, (seq, m) in enumerate(zip(seqs, masks)):
        length = len(seq) - 1
        inputs[i, :length] = seq[:-1]
        targets[i, :length] = seq[1:]
        mask[i, :length] = m[1:]
    return Batch(inputs, targets, mask, sum(lengths))
