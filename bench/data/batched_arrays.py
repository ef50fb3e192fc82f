"""Labelled arrays as a map-style dataset that a ``DataLoader`` reads a whole batch at a time.

The image cache and the feature cache both hold ``data [N, ...]`` (memory-mapped), ``targets
uint8 [N, C]`` and ``ignore bool [N, C]``. Reading them one item at a time costs a NumPy index, two
dtype conversions and a ``torch.stack`` per item, which on a small head dominates a frozen-protocol
epoch. ``torch.utils.data`` lets a dataset answer a whole list of indices through
``__getitems__``; :class:`ArrayItems` does so with one fancy-index read per array, and
:func:`array_loader` pairs it with :func:`collate_fetched`, which passes the batch through.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from bench.data.label_checks import TrainingDataWarning, batch_message


class FetchedBatch(NamedTuple):
    """A batch read in one go: ``data [B, ...]``, ``targets float [B, C]``, ``ignore bool [B, C]``,
    and, for training items, ``known bool [B, C]`` (None for evaluation items); ``rows int64 [B]``:
    the items' indices (a loss that corrects labels for good keeps them per image: LL-Cp)."""

    data: torch.Tensor
    targets: torch.Tensor
    ignore: torch.Tensor
    known: torch.Tensor | None = None
    rows: torch.Tensor | None = None


class ArrayItems(torch.utils.data.Dataset):
    """Items ``(data[i] as stored, target float [C], ignore bool [C])`` over aligned arrays, and
    ``(..., known bool [C])`` when built with an observed mask (training items).

    Args:
        data: [N, ...] any NumPy dtype torch understands (uint8 images, float16 features), possibly
            memory-mapped.
        targets: uint8 or float [N, C]; ignore: bool [N, C].
        known: bool [N, C], the training split's observed mask (``bench.api.observe.observed_mask``),
            or None: evaluation items, three elements per item as before. Given, every item and
            batch has it as a FOURTH element (all True when every label is observed), so a
            training loop unpacks ``inputs, targets, ignore, known``.
    """

    def __init__(self, data: np.ndarray, targets: np.ndarray, ignore: np.ndarray, known: np.ndarray | None = None) -> None:
        if not (len(data) == len(targets) == len(ignore)):
            raise ValueError(f"arrays disagree on N: data {len(data)}, targets {len(targets)}, ignore {len(ignore)}")
        self.data = data
        self.targets = np.ascontiguousarray(targets, dtype=np.float32)
        self.ignore = np.ascontiguousarray(ignore, dtype=bool)
        self.known = None if known is None else np.ascontiguousarray(known, dtype=bool)
        if self.known is not None and self.known.shape != self.targets.shape:
            raise ValueError(f"known {self.known.shape} and targets {self.targets.shape} disagree")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        item = (
            torch.from_numpy(np.array(self.data[index])),
            torch.from_numpy(self.targets[index].copy()),
            torch.from_numpy(self.ignore[index].copy()),
        )
        return item if self.known is None else (*item, torch.from_numpy(self.known[index].copy()))

    def __getitems__(self, indices: list[int]) -> FetchedBatch:
        rows = np.asarray(indices, dtype=np.int64)
        return FetchedBatch(
            torch.from_numpy(self.data[rows]),  # fancy indexing copies, even from a memmap
            torch.from_numpy(self.targets[rows]),
            torch.from_numpy(self.ignore[rows]),
            None if self.known is None else torch.from_numpy(self.known[rows]),
            torch.from_numpy(rows),
        )


def collate_fetched(batch: Any) -> tuple[torch.Tensor, ...]:
    """The ``collate_fn`` of :func:`array_loader`: the dataset already built the batch;
    ``(data, targets, ignore)``, plus ``known`` for training items."""
    if not isinstance(batch, FetchedBatch):
        raise TypeError(f"collate_fetched expects the FetchedBatch of ArrayItems.__getitems__, got {type(batch).__name__}")
    if batch.known is None:
        return batch.data, batch.targets, batch.ignore
    return batch.data, batch.targets, batch.ignore, batch.known


def collate_with_rows(batch: Any) -> tuple[torch.Tensor, ...]:
    """The ``collate_fn`` of ``array_loader(..., rows=True)``: ``(data, targets, ignore, known,
    rows int64 [B])``; ``known`` is all True when the items carry no observed mask."""
    if not isinstance(batch, FetchedBatch) or batch.rows is None:
        raise TypeError(f"collate_with_rows expects the FetchedBatch of ArrayItems.__getitems__, got {type(batch).__name__}")
    known = batch.known if batch.known is not None else torch.ones_like(batch.ignore, dtype=torch.bool)
    return batch.data, batch.targets, batch.ignore, known, batch.rows


def array_loader(items: ArrayItems, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, rows: bool = False) -> torch.utils.data.DataLoader:
    """A single-process ``DataLoader`` yielding ``(data [B, ...], targets [B, C], ignore [B, C])``,
    with ``known [B, C]`` as a fourth element when ``items`` carries an observed mask, and, with
    ``rows``, always ``known`` and then the items' indices ``rows int64 [B]`` as a fifth.

    Without ``generator`` the loader gets a fresh one of its own: a DataLoader draws a base seed
    from its generator each time it is iterated, and drawing it from the global generator would
    make an evaluation between epochs change the dropout draws of the epochs after it.
    A training loader (``shuffle``) whose batch is larger than its items says so
    (:class:`~bench.data.label_checks.TrainingDataWarning`): the epoch is then one batch.
    """
    message = batch_message(batch_size, len(items)) if shuffle else None
    if message is not None:
        warnings.warn(message, TrainingDataWarning, stacklevel=2)
    return torch.utils.data.DataLoader(
        items, batch_size=batch_size, shuffle=shuffle, generator=generator if generator is not None else torch.Generator(),
        num_workers=0, collate_fn=collate_with_rows if rows else collate_fetched,
    )
