"""Label states: what a head that reads labels (``reads_label_states = True``) is told per image.

A label state is an integer tensor [B, C]: ``-1`` the label is unknown, ``0`` known negative,
``1`` known positive. In training such a head receives the draw of :func:`draw_label_states`
(label mask training, LMT: C-Tran, Lanchantin et al., CVPR 2021); in evaluation it receives
``None``, which means every label is unknown (the release's evaluation with no known label).

The draw, per image, as the release's ``get_unk_mask_indices`` (QData/C-Tran
``dataloaders/data_utils.py``, training branch, with ``known_labels > 0`` as ``--use_lmt`` sets):

    k ~ uniform on {0, 1, ..., floor(0.75 C)}      ``random.randint(0, int(num_labels * 0.75))``,
                                                   both ends included
    K ~ uniform over the k-subsets of the C labels  the release samples the C - k UNKNOWN labels
                                                   with ``random.sample``: the complement is a
                                                   uniform k-subset
    state_c = target_c for c in K, -1 otherwise    ``mask.scatter_(0, unknown, -1)`` on the labels

Here the draws come from a ``torch.Generator`` the caller owns (the release reseeds Python's
``random`` from the OS per image), so a run's label states follow from its seed: the same
generator state gives the same states. Labels the dataset marks as ignored (e.g. VOC "difficult")
are never revealed: they are drawn like any other and then set to unknown.
"""

from __future__ import annotations

import torch

UNKNOWN, NEGATIVE, POSITIVE = -1, 0, 1
KNOWN_FRACTION_NUM, KNOWN_FRACTION_DEN = 3, 4  # at most floor(0.75 C) labels are revealed per image


def max_known(num_classes: int) -> int:
    """floor(0.75 C): the most labels one training image may reveal (the release's ``int(C * 0.75)``)."""
    return num_classes * KNOWN_FRACTION_NUM // KNOWN_FRACTION_DEN


def draw_label_states(targets: torch.Tensor, generator: torch.Generator, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """The label-mask-training states of a batch.

    Args:
        targets: [B, C] ground truth, 0/1 (any dtype; a value > 0.5 is positive).
        generator: the stream the draws come from (advanced by exactly two draws per call: the B
            counts, then B x C uniforms); its device is where the draws are made.
        ignore: optional bool [B, C]; True entries stay unknown whatever the draw.

    Returns:
        int64 [B, C] on ``targets``' device: -1 unknown, 0 known negative, 1 known positive; row b
        reveals k_b ~ U{0..floor(0.75 C)} labels chosen uniformly at random (fewer if some are ignored).
    """
    if targets.ndim != 2:
        raise ValueError(f"targets must be [B, C], got shape {tuple(targets.shape)}")
    b, c = targets.shape
    device = generator.device
    counts = torch.randint(0, max_known(c) + 1, (b, 1), generator=generator, device=device)  # k_b
    # rank of each label in a uniformly random order of the C labels (float64: ties have
    # probability ~C² 2^-53); the labels ranked below k_b are a uniform k_b-subset
    order = torch.rand(b, c, generator=generator, device=device, dtype=torch.float64).argsort(dim=1, stable=True)
    ranks = order.argsort(dim=1, stable=True)
    known = (ranks < counts).to(targets.device)
    if ignore is not None:
        known &= ~ignore.to(device=targets.device, dtype=torch.bool)
    states = (targets > 0.5).long()
    return torch.where(known, states, torch.full_like(states, UNKNOWN))


def label_state_indices(label_state: torch.Tensor | None, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """A head's view of ``label_state``: int64 [B, C] indices 0 = unknown, 1 = known negative,
    2 = known positive (the release's ``custom_replace(mask, 0, 1, 2)``); ``None`` = all unknown.

    Raises ``ValueError`` for a wrong shape or a value other than -1, 0, 1.
    """
    if label_state is None:
        return torch.zeros(batch, num_classes, dtype=torch.long, device=device)
    if tuple(label_state.shape) != (batch, num_classes):
        raise ValueError(f"label_state must be [B, C] = [{batch}, {num_classes}], got shape {tuple(label_state.shape)}")
    states = label_state.to(device=device)
    if states.is_floating_point():
        if not torch.equal(states, states.round()):
            raise ValueError("label_state values must be -1 (unknown), 0 (known negative) or 1 (known positive)")
        states = states.long()
    if bool(((states < UNKNOWN) | (states > POSITIVE)).any()):
        raise ValueError("label_state values must be -1 (unknown), 0 (known negative) or 1 (known positive)")
    return states.long() - UNKNOWN
