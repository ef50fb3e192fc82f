"""What a head may know about the data: the one value the runner hands to every head builder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.api.dataset import cooccurrence


@dataclass(frozen=True)
class HeadContext:
    """Facts about the training split a head may use (SPEC §2).

    Attributes:
        class_names: the C class names in label order.
        counts: int64 [C, C], training images holding both labels i and j (zero diagonal).
        nums: int64 [C], training images holding label i.
    """

    class_names: tuple[str, ...]
    counts: np.ndarray
    nums: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_labels(
        cls, class_names: list[str] | tuple[str, ...], targets: np.ndarray, ignore: np.ndarray | None = None
    ) -> "HeadContext":
        """Build the context from a training split's targets [N, C] (ignored entries not counted)."""
        counts, nums = cooccurrence(targets, ignore)
        return cls(tuple(class_names), counts, nums)
