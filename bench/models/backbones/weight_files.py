"""Local weight files: finding them (or their name in the torch hub cache), reading every format
(plain state dict, checkpoint dict, safetensors) safely, hashing them, and loading them into a
model with a clear report of what does not fit. Nothing is downloaded."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from bench.core.errors import UsageError
from bench.models.backbones.base import NUM_BATCHES_TRACKED

# --------------------------------------------------------------------------------------------
# Files


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (hex), cached per (path, size, modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def hub_checkpoint_dir() -> Path:
    """The torch hub cache of weight files: ``$TORCH_HOME/hub/checkpoints`` (default
    ``~/.cache/torch/hub/checkpoints``), read from the environment at each call."""
    return Path(torch.hub.get_dir()) / "checkpoints"


HUB_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def resolve_weights_path(weights: str | Path) -> tuple[Path, str]:
    """The local file ``weights`` names, and its origin string.

    ``weights`` as given (``~`` expanded) if that file exists; else, for a bare file name, the
    file of that name in :func:`hub_checkpoint_dir`. A torch hub file whose name carries a hash
    prefix (``resnet101-cd907fc2.pth``) must have a SHA-256 starting with it (a truncated or
    corrupted download is an error, as in ``torch.hub``).
    """
    given = Path(weights).expanduser()
    if given.is_file():
        path = given.resolve()
        return path, f"file: {path} (sha256 {file_sha256(path)[:12]})"
    looked = [str(given.resolve())]
    if given.name == str(weights) and given.name:  # a bare file name: try the torch hub cache
        cached = hub_checkpoint_dir() / given.name
        looked.append(str(cached))
        if cached.is_file():
            path = cached.resolve()
            sha = file_sha256(path)
            match = HUB_HASH.search(path.name)
            if match and not sha.startswith(match.group(1)):
                raise UsageError(
                    f"weights file {path} (from the torch hub cache) has sha256 {sha[:12]}..., which does not start "
                    f"with the {match.group(1)!r} in its name: the file is truncated or corrupted"
                )
            return path, f"file: {path} (sha256 {sha[:12]}; torch hub cache)"
    if given.exists():
        raise UsageError(f"weights {str(weights)!r}: {given} is not a file")
    raise UsageError(
        f"weights file {str(weights)!r} does not exist (looked at {' and '.join(looked)}); weights are only "
        "read from local files, never downloaded. Pass an existing path, a file name in the torch hub cache "
        "($TORCH_HOME/hub/checkpoints), or omit 'weights' for random init"
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local weights file as a flat ``{name: tensor}`` dict.

    Accepts a plain state dict, a checkpoint dict holding one under ``state_dict`` or ``model``
    (in that order of preference), or a ``.safetensors`` file; pickled files are read with
    ``torch.load(weights_only=True)``. Strips ``module.`` (DDP) and ``_orig_mod.``
    (``torch.compile``) prefixes, in any combination. Any other content is a :class:`UsageError`
    naming the problem. ``path`` must exist (see :func:`resolve_weights_path` for hub names).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist (weights are only read from local files)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        except Exception as exc:
            raise UsageError(f"weights file {path} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refused or not a torch file at all
            raise UsageError(f"weights file {path} is not a readable torch state dict (read with weights_only=True): {exc}") from exc
    layout = "a plain state dict"
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj, layout = obj[key], f"the checkpoint's {key!r} entry"
                break
    if not isinstance(obj, dict):
        raise UsageError(
            f"weights file {path} holds a {type(obj).__name__}, not a state dict "
            "(expected {name: tensor}, or a checkpoint dict with 'state_dict' or 'model')"
        )
    if not obj:
        raise UsageError(f"weights file {path}: {layout} is empty")
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UsageError(
            f"weights file {path}: {layout} is not a state dict; entries that are not tensors: {shown(not_tensors)} "
            "(expected {name: tensor}, or a checkpoint dict with 'state_dict' or 'model')"
        )
    cleaned: dict[str, torch.Tensor] = {}
    clashes: list[str] = []
    for key, value in obj.items():
        new = _strip_prefixes(str(key))
        if new in cleaned:
            clashes.append(f"{key!r} -> {new!r}")
        cleaned[new] = value
    if clashes:
        raise UsageError(f"weights file {path}: keys collide once 'module.' / '_orig_mod.' are stripped: {shown(clashes)}")
    return cleaned


def shown(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def load_weights_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    classifier: Iterable[str] = ("fc.", "classifier.", "head."),
) -> None:
    """Load ``state`` into ``model`` (a full ImageNet-style model, classifier included).

    The classifier's keys (``classifier`` prefixes) may be missing, unused or of another shape
    (the harness replaces the classifier by a head); ``num_batches_tracked`` buffers may be
    missing (old checkpoints). Any other missing, unexpected or mis-shaped key is a
    :class:`UsageError` that lists them (up to 10 per kind, with the count).
    """
    prefixes = tuple(classifier)
    own = model.state_dict()

    def is_classifier(key: str) -> bool:
        return bool(prefixes) and key.startswith(prefixes)

    missing = [k for k in own if k not in state and not is_classifier(k) and not k.endswith(NUM_BATCHES_TRACKED)]
    unexpected = [k for k in state if k not in own and not is_classifier(k)]
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape and not is_classifier(k)
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
            if keys:
                parts.append(f"{label}: {shown(keys)}")
        raise UsageError(f"weights file {source} does not fit this backbone; " + "; ".join(parts))
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
