"""ML-GCN: a label graph turns label embeddings into the classifier (SPEC §2, seed 004; Chen et al., CVPR 2019).

Shapes: x [B, d, h, w] (any h, w >= 1); C classes; E label embeddings [C, e].

Adjacency (:func:`build_adjacency`, from the TRAINING split's labels via ``context``):

    P = counts / nums[:, None]                 P[i, j] = P(L_j | L_i); a row with nums[i] = 0 is 0
    A = (P >= tau)                             binary, zero diagonal (counts has a zero diagonal)
    paper:    A'_ij = p · A_ij / Σ_{k≠i} A_ik  (i ≠ j; 0 when the row is empty),  A'_ii = 1 - p
    official: A' = A · p / (A.sum(axis=0) + 1e-6) + I       (column sums, as the released gen_A)

    Â = D^-1/2 A'^T D^-1/2,  D = diag(rowsum(A'))         (the released gen_adj; a zero row sum,
                                                          possible only with the paper variant at
                                                          p = 1 and an empty row, gets D^-1/2 = 0)

Graph convolutions (weights [in, out], no bias, as the release; LeakyReLU slope 0.2):

    H1 = LeakyReLU(Â E W1)     [C, e] @ [e, 1024] -> [C, 1024]
    W  = Â H1 W2               [C, 1024] @ [1024, d] -> [C, d]      the per-class classifiers

Image side: f = global max pool of x -> [B, d];  logits = f @ Wᵀ -> [B, C] (no bias).

Hyper-parameters: ``tau`` in (0, 1] (0.4), ``p`` in [0, 1] (0.2), ``reweight`` "paper" | "official",
``graph`` "cooccurrence" | "identity" (control: A' = I, so Â = I and the GCN sees no other label),
``embeddings`` "onehot" (E = I_C, e = C; offline default) or "glove:PATH" (:func:`load_embeddings`).
Â and E are buffers (saved with the weights). The context is required (class names, counts, nums).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from bench.api import Head, HeadContext, Heatmap, register_head

REWEIGHTS = ("paper", "official")
GRAPHS = ("cooccurrence", "identity")
HIDDEN = 1024
SEPARATORS = ("_", "-", " ", "/")


def _check_tau_p(tau: float, p: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 < tau <= 1.0):
        raise ValueError(f"tau = {tau!r} is out of range; allowed: 0 < tau <= 1")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
        raise ValueError(f"p = {p!r} is out of range; allowed: 0 <= p <= 1")


def build_adjacency(counts: np.ndarray, nums: np.ndarray, tau: float, p: float, reweight: str = "paper") -> np.ndarray:
    """A' (before normalisation) as float64 [C, C] from training co-occurrence (SPEC §2).

    Args:
        counts: [C, C] images holding both i and j (the diagonal is ignored: treated as 0).
        nums: [C] images holding i; a label with nums = 0 has an empty row of P (no edges).
        tau: binarisation threshold in (0, 1]; ``A = P >= tau``.
        p: re-weighting in [0, 1].
        reweight: ``"paper"`` or ``"official"``.
    """
    _check_tau_p(tau, p)
    if reweight not in REWEIGHTS:
        raise ValueError(f"reweight = {reweight!r} is not allowed; allowed values: {', '.join(map(repr, REWEIGHTS))}")
    counts = np.asarray(counts, dtype=np.float64)
    nums = np.asarray(nums, dtype=np.float64)
    c = counts.shape[0]
    if counts.shape != (c, c) or nums.shape != (c,):
        raise ValueError(f"counts must be [C, C] and nums [C]; got {counts.shape} and {nums.shape}")
    counts = counts.copy()
    np.fill_diagonal(counts, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        prob = np.where(nums[:, None] > 0, counts / np.where(nums > 0, nums, 1.0)[:, None], 0.0)
    adj = (prob >= tau).astype(np.float64)
    eye = np.eye(c)
    if reweight == "paper":
        row = adj.sum(axis=1, keepdims=True)
        off = np.divide(p * adj, row, out=np.zeros_like(adj), where=row > 0)
        return off + (1.0 - p) * eye
    return adj * p / (adj.sum(axis=0, keepdims=True) + 1e-6) + eye


def normalize_adjacency(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Â = D^-1/2 A'^T D^-1/2 with D = diag(rowsum(A')) (released ``gen_adj``); float64 tensor."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64) if isinstance(a, np.ndarray) else a, dtype=torch.float64)
    rowsum = a.sum(dim=1)
    d = torch.where(rowsum > 0, rowsum.clamp_min(1e-300).pow(-0.5), torch.zeros_like(rowsum))
    return d[:, None] * a.t() * d[None, :]


# ----------------------------------------------------------------------------------------------
# Label embeddings


def _tokens(name: str) -> list[str]:
    text = name
    for sep in SEPARATORS[1:]:
        text = text.replace(sep, SEPARATORS[0])
    return [t for t in text.split(SEPARATORS[0]) if t]


def _segment(word: str, vocab: set[str]) -> list[str] | None:
    """Split a compound written without separators (``pottedplant``) into the FEWEST vocabulary
    words (ties: the longest first piece), or None when impossible. Pieces have >= 2 letters."""
    n = len(word)
    best: list[list[str] | None] = [None] * (n + 1)
    best[n] = []
    for i in range(n - 1, -1, -1):
        for j in range(n, i + 1, -1):  # longest piece first
            tail = best[j]
            if tail is not None and word[i:j] in vocab and (best[i] is None or len(tail) + 1 < len(best[i])):
                best[i] = [word[i:j], *tail]
    return best[0]


def _glove_candidates(name: str) -> set[str]:
    """Every string that may be looked up for class ``name`` (so a big GloVe file is read once,
    keeping only these words)."""
    out = {name, name.lower()}
    for token in _tokens(name) + [name.replace("_", "").replace(" ", "").replace("-", "")]:
        for t in (token, token.lower()):
            out.add(t)
            out.update(t[i:j] for i in range(len(t)) for j in range(i + 2, len(t) + 1))
    return out


def _read_glove_text(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    dim = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if len(parts) < 2:
                continue
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # a word2vec-style header "<count> <dim>"
            # the word itself may contain spaces in some releases: the vector is the last `dim` fields
            if dim is None:
                dim = len(parts) - 1
            word = " ".join(parts[: len(parts) - dim])
            if word in wanted and word not in vectors:
                try:
                    vectors[word] = np.asarray(parts[len(parts) - dim :], dtype=np.float64)
                except ValueError as exc:
                    raise ValueError(f"GloVe file {path}, line {line_no}: not a word followed by {dim} numbers ({exc})") from None
    if dim is None:
        raise ValueError(f"GloVe file {path} holds no vectors")
    return vectors


def glove_vector(name: str, vectors: dict[str, np.ndarray]) -> tuple[np.ndarray | None, list[str]]:
    """The embedding of class ``name`` from word vectors, and the words used (or missing).

    Rule: the whole name as written, then lower-cased; else its words (split on ``_ - / space``),
    each looked up as is / lower-cased, and, if absent, split into the fewest vocabulary words
    (``pottedplant`` -> ``potted plant``, ``tvmonitor`` -> ``tv monitor``); the class vector is the
    MEAN of its word vectors. Returns (None, missing words) when some word has no vector.
    """
    for key in (name, name.lower()):
        if key in vectors:
            return vectors[key], [key]
    vocab = set(vectors)
    words, missing = [], []
    for token in _tokens(name) or [name]:
        hit = next((t for t in (token, token.lower()) if t in vectors), None)
        if hit is not None:
            words.append(hit)
            continue
        pieces = _segment(token.lower(), vocab) or _segment(token, vocab)
        if pieces:
            words.extend(pieces)
        else:
            missing.append(token)
    if missing:
        return None, missing
    return np.mean([vectors[w] for w in words], axis=0), words


def load_embeddings(spec: str, class_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Label embeddings [C, e] (float64) for ``embeddings = spec``.

    - ``"onehot"``: the identity [C, C].
    - ``"glove:PATH.npy"``: a [C, e] array whose rows are in the dataset's class order (e.g. the
      released ``voc_glove_word2vec.npy``).
    - ``"glove:PATH"`` (any other file): a GloVe / word2vec TEXT file (``word v1 ... ve`` per line),
      looked up by class name (:func:`glove_vector`); a class with a missing word is an error that
      lists every missing word.
    """
    c = len(class_names)
    if spec == "onehot":
        return np.eye(c)
    if not isinstance(spec, str) or not spec.startswith("glove:") or len(spec) == len("glove:"):
        raise ValueError(f"embeddings = {spec!r} is not allowed; allowed: 'onehot' or 'glove:PATH' (a [C, e] .npy file or a GloVe text file)")
    path = Path(spec[len("glove:") :]).expanduser()
    if not path.is_file():
        raise ValueError(f"embeddings = {spec!r}: file {path} does not exist")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2 or array.shape[0] != c:
            raise ValueError(f"embeddings file {path} has shape {array.shape}; expected [C, e] with C = {c} rows in the dataset's class order")
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"embeddings file {path} holds non-finite values")
        return array
    wanted: set[str] = set()
    for name in class_names:
        wanted |= _glove_candidates(name)
    vectors = _read_glove_text(path, wanted)
    rows, problems = [], []
    for name in class_names:
        vec, words = glove_vector(name, vectors)
        if vec is None:
            problems.append(f"{', '.join(map(repr, words))} (class {name!r})")
        rows.append(vec)
    if problems:
        raise ValueError(f"GloVe file {path} has no vector for: {'; '.join(problems)}")
    return np.stack(rows)


# ----------------------------------------------------------------------------------------------
# Head


class GraphConvolution(nn.Module):
    """``Â @ (X @ W)``, W [in, out] initialised uniform in ±1/sqrt(out) (the release), no bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(out_features)
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return adj @ (x @ self.weight)


@register_head("ml_gcn")
class MLGCNHead(Head):
    """Global max pooling, classifier W [C, d] produced by a 2-layer GCN over the label graph."""

    sweep = (
        {"tau": [0.3, 0.4, 0.5], "p": [0.1, 0.2, 0.25, 0.3], "reweight": "paper", "embeddings": "onehot"},  # 12
        {"tau": 0.4, "p": 0.25, "reweight": "official"},  # the released code's re-weighting at its own setting
        {"graph": "identity"},  # control: no label graph (A' = I), same GCN, max pooling and embeddings
    )
    heatmap = Heatmap(
        y="tau", x="p", title="ML-GCN: mAP over τ × p", y_label="τ (co-occurrence threshold)", x_label="p (re-weighting)",
        where={"reweight": "paper"}, slug="mlgcn_tau_p",
    )

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        context: HeadContext | None = None,
        *,
        tau: float = 0.4,
        p: float = 0.2,
        reweight: Literal["paper", "official"] = "paper",
        graph: Literal["cooccurrence", "identity"] = "cooccurrence",
        embeddings: str = "onehot",
    ) -> None:
        super().__init__()
        _check_tau_p(tau, p)
        if reweight not in REWEIGHTS:
            raise ValueError(f"reweight = {reweight!r} is not allowed; allowed values: {', '.join(map(repr, REWEIGHTS))}")
        if graph not in GRAPHS:
            raise ValueError(f"graph = {graph!r} is not allowed; allowed values: {', '.join(map(repr, GRAPHS))}")
        if context is None:
            raise ValueError("ml_gcn needs the training split's label co-occurrence (a HeadContext with class_names, counts, nums); got context=None")
        if context.num_classes != num_classes:
            raise ValueError(f"context has {context.num_classes} classes but num_classes = {num_classes}")
        if graph == "identity":
            a = np.eye(num_classes)
        else:
            a = build_adjacency(context.counts, context.nums, tau, p, reweight)
        emb = load_embeddings(embeddings, context.class_names)
        self.register_buffer("adj", normalize_adjacency(a).float())  # Â [C, C]
        self.register_buffer("embeddings", torch.as_tensor(emb, dtype=torch.float32))  # E [C, e]
        self.gc1 = GraphConvolution(emb.shape[1], HIDDEN)
        self.gc2 = GraphConvolution(HIDDEN, in_channels)
        self.act = nn.LeakyReLU(0.2)

    def classifiers(self) -> torch.Tensor:
        """W [C, d] from the label graph."""
        h1 = self.act(self.gc1(self.embeddings, self.adj))
        return self.gc2(h1, self.adj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = x.flatten(2).amax(dim=2)  # [B, d]
        w = self.classifiers().to(feature.dtype)  # [C, d]
        return feature @ w.t()

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        emb = hparams.get("embeddings", "onehot")
        emb = str(emb)
        emb_text = "one-hot" if emb == "onehot" else f"GloVe {Path(emb[len('glove:'):]).name}" if emb.startswith("glove:") else emb
        if hparams.get("graph", "cooccurrence") == "identity":
            return f"identity graph, {emb_text}"
        return f"τ={hparams.get('tau', 0.4):g}, p={hparams.get('p', 0.2):g}, {hparams.get('reweight', 'paper')}, {emb_text}"
