"""A run's scores on an evaluated split, as every process holds them after the gather."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Predictions:
    """Scores float32 [N, C] (sigmoid), targets uint8 [N, C], ignore bool [N, C], and the seconds
    the evaluation pass took."""

    scores: np.ndarray
    targets: np.ndarray
    ignore: np.ndarray
    seconds: float
