"""VOC-style "difficult" labels: the policies a dataset can apply, and what each does.

Kept free of torch so that the report can name a run's policy without importing it.
"""

from __future__ import annotations

import numpy as np

from bench.core.errors import DataError, choices

#: VOC-style difficult-label policies and what each means (shown in the leaderboard's legend)
DIFFICULT_POLICIES: dict[str, str] = {
    "ignore": "difficult labels are negatives in training and ignored in evaluation",
    "positive": "difficult labels count as positives",
    "negative": "difficult labels count as negatives",
    "train_positive": "difficult labels are positives in training and ignored in evaluation (ML-GCN's release)",
}


def apply_difficult_policy(
    positive: np.ndarray, difficult: np.ndarray, policy: str
) -> tuple[np.ndarray, np.ndarray]:
    """Resolve VOC-style difficult labels into training targets and an evaluation ignore mask.

    Args:
        positive: bool [N, C], True where the label is a (non-difficult) positive.
        difficult: bool [N, C], True where the label is marked difficult.
        policy: ``"ignore"`` (negative in training, ignored in evaluation; the papers' protocol),
            ``"positive"`` or ``"negative"`` (counted as that label everywhere), or
            ``"train_positive"`` (positive in training, ignored in evaluation: ML-GCN's release).

    Returns:
        ``(targets uint8 [N, C], ignore bool [N, C])``.
    """
    if policy not in DIFFICULT_POLICIES:
        raise DataError(f"difficult policy {policy!r} is not one of {choices(DIFFICULT_POLICIES)}")
    positive = np.asarray(positive, dtype=bool)
    difficult = np.asarray(difficult, dtype=bool) & ~positive
    if policy == "positive":
        return (positive | difficult).astype(np.uint8), np.zeros_like(positive)
    if policy == "negative":
        return positive.astype(np.uint8), np.zeros_like(positive)
    if policy == "train_positive":  # evaluation never reads an ignored entry's target
        return (positive | difficult).astype(np.uint8), difficult
    return positive.astype(np.uint8), difficult
