"""The seed heads (SPEC §2): shapes, independent float64 references, adjacency on the genuine VOC2007
co-occurrence, label embeddings, error messages, and that training lowers the loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.api import registry
from bench.api.context import HeadContext
from bench.core.errors import UsageError

SIZES = (1, 3, 7, 14)
HEADS = ("baseline", "csra", "csra_free", "ml_gcn", "attention_fusion")
TEMPS = {1: [1.0], 2: [1.0, math.inf], 4: [1.0, 2.0, 4.0, math.inf], 6: [1.0, 2.0, 3.0, 4.0, 5.0, math.inf], 8: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.inf]}
VOC = "voc_cooccurrence.npz"


def _module(name: str):
    """The imported plugin module of head ``name`` (plugins are imported by path, not by package)."""
    import sys

    return sys.modules[registry.head_class(name).__module__]


def make_context(num_classes: int = 6, n: int = 200, seed: int = 0, names: list[str] | None = None) -> HeadContext:
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, num_classes)) < rng.uniform(0.1, 0.5, num_classes)).astype(np.uint8)
    return HeadContext.from_labels(names or [f"class_{i}" for i in range(num_classes)], targets)


def build(name: str, d: int, c: int, context: HeadContext | None = None, **hparams) -> nn.Module:
    head = registry.build_head(name, d, c, context if context is not None else make_context(c), **hparams)
    if name == "csra_free":
        source = registry.build_head("baseline", d, c, pool="avg")
        head.adopt(source)
    return head


# ------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("name", HEADS)
def test_every_head_maps_any_spatial_size_to_logits(name: str) -> None:
    torch.manual_seed(0)
    d, c = 12, 5
    head = build(name, d, c)
    for h in SIZES:
        for w in SIZES:
            out = head(torch.randn(3, d, h, w))
            assert out.shape == (3, c), (name, h, w)
            assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# CSRA against an independent float64 implementation of SPEC §2


def csra_reference(x: np.ndarray, weight: np.ndarray, temps: list[float], lam: float) -> np.ndarray:
    """SPEC §2 written out: x [B, d, h, w], weight [H, C, d] -> logits [B, C] (float64, loops)."""
    b, d = x.shape[:2]
    flat = x.reshape(b, d, -1)  # [B, d, N]
    out = np.zeros((b, weight.shape[1]))
    for j, t in enumerate(temps):
        m = weight[j] / np.sqrt((weight[j] ** 2).sum(axis=1, keepdims=True))  # [C, d]
        for i in range(b):
            s = m @ flat[i]  # [C, N]: s_kc for every class c and position k
            base = s.sum(axis=1) / s.shape[1]
            if math.isinf(t):
                att = s.max(axis=1)
            else:
                att = np.zeros(s.shape[0])
                for c in range(s.shape[0]):
                    e = np.exp(t * s[c] - (t * s[c]).max())
                    att[c] = (e / e.sum() * s[c]).sum()
            out[i] += base + lam * att
    return out


@pytest.mark.parametrize("num_heads", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_csra_matches_float64_reference(num_heads: int, lam: float) -> None:
    rng = np.random.default_rng(num_heads)
    d, c = 10, 7
    head = registry.build_head("csra", d, c, num_heads=num_heads, lam=lam).double()
    weight = rng.normal(size=(num_heads, c, d)) * rng.uniform(0.1, 5, size=(num_heads, c, 1))
    torch.nn.utils.vector_to_parameters(torch.from_numpy(weight.ravel()), head.parameters())
    for h, w in [(1, 1), (3, 5), (7, 7), (14, 14)]:
        x = rng.normal(size=(4, d, h, w)) * 2
        got = head(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, csra_reference(x, weight, TEMPS[num_heads], lam), rtol=1e-10, atol=1e-10)


def test_csra_single_head_infinite_temperature_is_mean_plus_lambda_max() -> None:
    rng = np.random.default_rng(1)
    d, c = 8, 4
    head = registry.build_head("csra", d, c, num_heads=1, lam=0.3, t1_inf=True).double()
    weight = rng.normal(size=(1, c, d))
    torch.nn.utils.vector_to_parameters(torch.from_numpy(weight.ravel()), head.parameters())
    x = rng.normal(size=(3, d, 5, 4))
    got = head(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, csra_reference(x, weight, [math.inf], 0.3), rtol=1e-10, atol=1e-10)
    assert not np.allclose(got, csra_reference(x, weight, [1.0], 0.3))


def test_csra_parameters_read_as_heads_classes_channels() -> None:
    d, c = 6, 5
    for num_heads in (1, 2, 4, 6, 8):
        head = registry.build_head("csra", d, c, num_heads=num_heads)
        flat = torch.cat([p.detach().reshape(-1) for p in head.parameters()])
        assert flat.numel() == num_heads * c * d
        layout = flat.reshape(num_heads, c, d)
        # changing the [j, c] slice changes class c's logit only
        with torch.no_grad():
            x = torch.randn(2, d, 3, 3)
            before = head(x)
            layout[num_heads - 1, 2] = torch.randn(d)
            torch.nn.utils.vector_to_parameters(layout.reshape(-1), head.parameters())
            after = head(x)
        changed = (before - after).abs().amax(dim=0) > 1e-7
        assert changed.tolist() == [k == 2 for k in range(c)]


@pytest.mark.parametrize("bad", [0, 3, 5, 16])
def test_csra_rejects_other_head_counts_listing_the_allowed_ones(bad: int) -> None:
    with pytest.raises(UsageError) as info:
        registry.build_head("csra", 8, 3, num_heads=bad)
    message = str(info.value)
    assert "heads/csra.py" in message and f"num_heads = {bad}" in message and "1, 2, 4, 6, 8" in message


def test_csra_t1_inf_only_with_one_head() -> None:
    with pytest.raises(UsageError, match="only to num_heads = 1"):
        registry.build_head("csra", 8, 3, num_heads=4, t1_inf=True)


# ------------------------------------------------------------------------------------------------
# CSRA without training


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_csra_free_is_mean_plus_lambda_max_of_the_baseline_classifier(lam: float) -> None:
    torch.manual_seed(0)
    d, c = 9, 4
    baseline = registry.build_head("baseline", d, c, pool="avg").double()
    with torch.no_grad():
        baseline.fc.bias.copy_(torch.randn(c))
    x = torch.randn(3, d, 5, 6, dtype=torch.float64)
    wt, bias = baseline.fc.weight.detach().numpy(), baseline.fc.bias.detach().numpy()
    flat = x.numpy().reshape(3, d, -1)
    per_pos = np.stack([[wt @ flat[i][:, k] + bias for k in range(flat.shape[2])] for i in range(3)])  # [B, N, C], FC incl. bias
    literal = per_pos.mean(axis=1) + lam * per_pos.max(axis=1)  # seed 003's four lines
    for mode, expected in (("per_position", literal), ("once", literal - lam * bias)):
        head = registry.build_head("csra_free", d, c, lam=lam, bias=mode).double()
        head.adopt(baseline)
        np.testing.assert_allclose(head(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    if lam == 0.0:
        np.testing.assert_allclose(head(x).detach().numpy(), baseline(x).detach().numpy(), rtol=1e-10, atol=1e-10)


def test_csra_free_is_derived_from_the_average_pool_baseline() -> None:
    cls = registry.head_class("csra_free")
    assert cls.derived_from == ("baseline", {"pool": "avg"})
    head = registry.build_head("csra_free", 8, 3)
    with pytest.raises(ValueError, match="shape"):
        head.adopt(registry.build_head("baseline", 8, 4))


# ------------------------------------------------------------------------------------------------
# ML-GCN adjacency


def adjacency_loops(counts: np.ndarray, nums: np.ndarray, tau: float, p: float, reweight: str) -> np.ndarray:
    """SPEC §2 by explicit loops (float64)."""
    c = len(nums)
    a = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            if i != j and nums[i] > 0 and counts[i, j] / nums[i] >= tau:
                a[i, j] = 1.0
    out = np.zeros((c, c))
    if reweight == "paper":
        for i in range(c):
            row = sum(a[i, k] for k in range(c) if k != i)
            for j in range(c):
                if i == j:
                    out[i, j] = 1.0 - p
                elif row > 0:
                    out[i, j] = p * a[i, j] / row
    else:
        for j in range(c):
            col = sum(a[k, j] for k in range(c))
            for i in range(c):
                out[i, j] = a[i, j] * p / (col + 1e-6) + (1.0 if i == j else 0.0)
    return out


@pytest.mark.parametrize("tau", [0.05, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("p", [0.1, 0.2, 0.25, 0.3])
@pytest.mark.parametrize("reweight", ["paper", "official"])
def test_adjacency_on_genuine_voc2007_cooccurrence(shared_data: Path, tau: float, p: float, reweight: str) -> None:
    data = np.load(shared_data / "ml-gcn" / VOC)
    counts, nums = data["counts"], data["nums"]
    got = _module("ml_gcn").build_adjacency(counts, nums, tau, p, reweight)
    assert got.shape == (20, 20) and got.dtype == np.float64
    np.testing.assert_allclose(got, adjacency_loops(counts, nums, tau, p, reweight), rtol=1e-12, atol=1e-15)


def test_adjacency_on_voc2007_has_edges_and_the_paper_rows_sum_to_one(shared_data: Path) -> None:
    data = np.load(shared_data / "ml-gcn" / VOC)
    a = _module("ml_gcn").build_adjacency(data["counts"], data["nums"], 0.4, 0.2, "paper")
    off = a - np.diag(np.diag(a))
    nonempty = off.sum(axis=1) > 0
    assert nonempty.sum() >= 5  # e.g. chair -> person, diningtable -> chair at tau 0.4
    np.testing.assert_allclose(a.sum(axis=1)[nonempty], 1.0)
    np.testing.assert_allclose(a.sum(axis=1)[~nonempty], 0.8)


def test_adjacency_hand_computed_cases() -> None:
    build_adjacency = _module("ml_gcn").build_adjacency
    # P(1|0) = 2/4 = 0.5, P(0|1) = 2/2 = 1, label 2 co-occurs with nothing
    counts = np.array([[0, 2, 0], [2, 0, 0], [0, 0, 0]])
    nums = np.array([4, 2, 1])
    expected = np.array([[0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 0.8]])  # tau 0.5 reaches P = 0.5 (>=)
    np.testing.assert_allclose(build_adjacency(counts, nums, 0.5, 0.2, "paper"), expected)
    # tau just above 0.5: row 0 becomes empty (only its diagonal 1 - p stays)
    np.testing.assert_allclose(
        build_adjacency(counts, nums, 0.51, 0.2, "paper"), [[0.8, 0.0, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 0.8]]
    )
    # tau = 1 keeps exactly the certain implications (P = 1)
    np.testing.assert_allclose(build_adjacency(counts, nums, 1.0, 0.3, "paper"), [[0.7, 0, 0], [0.3, 0.7, 0], [0, 0, 0.7]])
    # official: column sums, + I
    q = 0.25 / (1 + 1e-6)
    np.testing.assert_allclose(build_adjacency(counts, nums, 0.5, 0.25, "official"), [[1, q, 0], [q, 1, 0], [0, 0, 1]])
    # a label absent from training (nums = 0) has an empty row, not NaN
    got = build_adjacency(counts, np.array([4, 2, 0]), 0.5, 0.2, "paper")
    assert np.isfinite(got).all() and got[2].tolist() == [0.0, 0.0, 0.8]
    # two rows of one label each pointing at two labels: p split evenly
    counts = np.array([[0, 3, 3], [3, 0, 0], [3, 0, 0]])
    np.testing.assert_allclose(build_adjacency(counts, np.array([3, 6, 6]), 0.5, 0.2, "paper")[0], [0.8, 0.1, 0.1])


def test_normalisation_is_the_released_gen_adj() -> None:
    normalize = _module("ml_gcn").normalize_adjacency
    a = np.array([[1.0, 0.5], [0.0, 1.0]])  # not symmetric: the transpose matters
    expected = np.array([[1 / 1.5, 0.0], [0.5 / math.sqrt(1.5), 1.0]])  # D^-1/2 A'^T D^-1/2, D = rowsum(A')
    np.testing.assert_allclose(normalize(a).numpy(), expected, rtol=1e-12)
    rng = np.random.default_rng(0)
    a = rng.random((6, 6)) + np.eye(6)
    t = torch.from_numpy(a)
    dm = torch.diag(t.sum(1).pow(-0.5))
    released = torch.matmul(torch.matmul(t, dm).t(), dm)  # gen_adj as seed 004 quotes it
    np.testing.assert_allclose(normalize(a).numpy(), released.numpy(), rtol=1e-12)


def test_ml_gcn_head_uses_the_context_graph() -> None:
    context = make_context(6, seed=3)
    mod = _module("ml_gcn")
    head = registry.build_head("ml_gcn", 16, 6, context, tau=0.3, p=0.25, reweight="official")
    expected = mod.normalize_adjacency(mod.build_adjacency(context.counts, context.nums, 0.3, 0.25, "official"))
    np.testing.assert_allclose(head.adj.numpy(), expected.numpy(), rtol=1e-6)
    identity = registry.build_head("ml_gcn", 16, 6, context, graph="identity")
    assert torch.equal(identity.adj, torch.eye(6))
    assert torch.equal(head.embeddings, torch.eye(6))  # one-hot default
    # logits = (global max pool of x) @ W^T with W from the GCN
    x = torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        w = head.classifiers()
        h1 = nn.functional.leaky_relu(head.adj @ head.embeddings @ head.gc1.weight, 0.2)
        np.testing.assert_allclose(w.numpy(), (head.adj @ h1 @ head.gc2.weight).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(head(x).numpy(), (x.amax(dim=(2, 3)) @ w.t()).numpy(), rtol=1e-4, atol=1e-5)
    assert tuple(head.gc1.weight.shape) == (6, 1024) and tuple(head.gc2.weight.shape) == (1024, 16)


@pytest.mark.parametrize("hparams, text", [({"tau": 1.5}, "0 < tau <= 1"), ({"tau": 0.0}, "0 < tau <= 1"), ({"p": 1.5}, "0 <= p <= 1"), ({"p": -0.1}, "0 <= p <= 1"), ({"reweight": "x"}, "'paper', 'official'"), ({"graph": "x"}, "'cooccurrence', 'identity'"), ({"embeddings": "word2vec"}, "'onehot' or 'glove:PATH'")])
def test_ml_gcn_rejects_bad_values_with_the_allowed_range(hparams: dict, text: str) -> None:
    with pytest.raises(UsageError) as info:
        registry.build_head("ml_gcn", 8, 6, make_context(6), **hparams)
    assert "heads/ml_gcn.py" in str(info.value) and text in str(info.value)


def test_ml_gcn_needs_a_context() -> None:
    with pytest.raises(UsageError, match="context=None"):
        registry.build_head("ml_gcn", 8, 6, None)


# ------------------------------------------------------------------------------------------------
# Label embeddings


def test_glove_npy_from_the_release(shared_data: Path) -> None:
    folder = shared_data / "ml-gcn"
    classes = (folder / "voc_classes.txt").read_text().split()
    data = np.load(folder / VOC)
    context = HeadContext(tuple(classes), data["counts"], data["nums"])
    array = np.load(folder / "voc_glove_word2vec.npy")
    head = registry.build_head("ml_gcn", 32, 20, context, embeddings=f"glove:{folder / 'voc_glove_word2vec.npy'}")
    assert tuple(head.embeddings.shape) == (20, 300) and tuple(head.gc1.weight.shape) == (300, 1024)
    np.testing.assert_allclose(head.embeddings.numpy(), array, rtol=1e-6)
    assert head(torch.randn(2, 32, 3, 3)).shape == (2, 20)
    small = HeadContext(tuple(classes[:5]), data["counts"][:5, :5], data["nums"][:5])
    with pytest.raises(UsageError, match="C = 5 rows"):
        registry.build_head("ml_gcn", 32, 5, small, embeddings=f"glove:{folder / 'voc_glove_word2vec.npy'}")


GLOVE_TEXT = {
    "dog": [1.0, 0.0, 0.0],
    "dining": [0.0, 2.0, 0.0],
    "table": [0.0, 0.0, 2.0],
    "potted": [4.0, 0.0, 0.0],
    "plant": [0.0, 4.0, 0.0],
    "pot": [9.0, 9.0, 9.0],  # a shorter prefix must not win over the two-word split
    "tv": [1.0, 1.0, 1.0],
    "monitor": [3.0, 3.0, 3.0],
    "train": [0.5, 0.5, 0.5],
}


def write_glove(path: Path, words: dict[str, list[float]]) -> Path:
    path.write_text("".join(f"{w} {' '.join(f'{v:.6f}' for v in vec)}\n" for w, vec in words.items()))
    return path


def test_glove_text_file_looks_up_class_names(tmp_path: Path) -> None:
    glove = write_glove(tmp_path / "glove.6B.3d.txt", GLOVE_TEXT)
    names = ["dog", "dining_table", "pottedplant", "tv monitor", "Train"]
    context = make_context(5, names=names)
    head = registry.build_head("ml_gcn", 8, 5, context, embeddings=f"glove:{glove}")
    expected = np.array([[1, 0, 0], [0, 1, 1], [2, 2, 0], [2, 2, 2], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(head.embeddings.numpy(), expected, rtol=1e-6)


def test_glove_text_file_lists_missing_words(tmp_path: Path) -> None:
    glove = write_glove(tmp_path / "glove.txt", GLOVE_TEXT)
    context = make_context(4, names=["dog", "zebra_crossing", "hair drier", "dining_table"])
    with pytest.raises(UsageError) as info:
        registry.build_head("ml_gcn", 8, 4, context, embeddings=f"glove:{glove}")
    message = str(info.value)
    for word in ("'zebra'", "'crossing'", "'hair'", "'drier'"):
        assert word in message
    assert "'dog'" not in message and "'dining'" not in message
    with pytest.raises(UsageError, match="does not exist"):
        registry.build_head("ml_gcn", 8, 4, context, embeddings=f"glove:{tmp_path / 'absent.txt'}")


# ------------------------------------------------------------------------------------------------
# Attention fusion


def test_attention_fusion_attention_is_a_distribution_over_positions() -> None:
    torch.manual_seed(0)
    head = registry.build_head("attention_fusion", 16, 5, attn_dim=8)
    for h, w in [(1, 1), (3, 7), (14, 14)]:
        x = torch.randn(2, 16, h, w)
        alpha = head.attention(x)
        assert alpha.shape == (2, 5, h * w)
        torch.testing.assert_close(alpha.sum(dim=2), torch.ones(2, 5))
        # logits = W g + b + γ Σ_k α_ck (w_c · x_k), written out with the fused feature z_c = g + γ f_c
        local = x.flatten(2)
        g = local.mean(dim=2)
        f = torch.einsum("bcn,bdn->bcd", alpha, local)
        z = g[:, None, :] + head.gamma * f
        expected = (z * head.fc.weight[None]).sum(dim=2) + head.fc.bias
        torch.testing.assert_close(head(x), expected, rtol=1e-4, atol=1e-5)


def test_attention_fusion_queries_depend_on_the_global_feature() -> None:
    torch.manual_seed(0)
    head = registry.build_head("attention_fusion", 8, 3, attn_dim=4)
    x = torch.randn(2, 8, 4, 5)
    local = x.flatten(2).double()  # [B, d, N]
    g = local.mean(dim=2)  # [B, d]
    wk, bk = head.key.weight.detach().double()[:, :, 0], head.key.bias.detach().double()
    wg, bg = head.context_query.weight.detach().double(), head.context_query.bias.detach().double()
    q = head.query.detach().double()
    for i in range(2):
        keys = wk @ local[i] + bk[:, None]  # [a, N]
        queries = q + (wg @ g[i] + bg)[None, :]  # [C, a]: class query + the image's global context
        w = head.fc.weight.detach().double()
        prior = (w / w.norm(dim=1, keepdim=True)) @ local[i]  # [C, N]: unit-norm classifier scores
        logits = prior + queries @ keys / 2.0  # sqrt(a) = 2
        expected = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
        torch.testing.assert_close(head.attention(x)[i].double(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        head.context_query.weight.zero_()
        head.context_query.bias.zero_()
    flat = head.attention(x)
    with torch.no_grad():
        head.context_query.weight.normal_()
    assert not torch.allclose(flat, head.attention(x))


@pytest.mark.parametrize("hparams", [{"attn_dim": 0}, {"gamma": math.inf}])
def test_attention_fusion_rejects_bad_values(hparams: dict) -> None:
    with pytest.raises(UsageError, match="heads/attention_fusion.py"):
        registry.build_head("attention_fusion", 8, 3, **hparams)


# ------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("baseline", {"pool": "avg"}),
        ("baseline", {"pool": "max"}),
        ("csra", {"num_heads": 1, "lam": 0.1}),
        ("csra", {"num_heads": 4, "lam": 0.5}),
        ("csra", {"num_heads": 8, "lam": 1.0}),
        ("csra", {"num_heads": 1, "t1_inf": True}),
        ("csra_free", {"lam": 0.3}),
        ("ml_gcn", {}),
        ("ml_gcn", {"reweight": "official", "p": 0.25}),
        ("ml_gcn", {"graph": "identity"}),
        ("attention_fusion", {}),
    ],
)
def test_optimisation_steps_lower_the_loss(name: str, hparams: dict) -> None:
    torch.manual_seed(0)
    d, c = 32, 6
    x = torch.relu(torch.randn(16, d, 5, 5))  # backbone features are post-ReLU
    targets = (torch.rand(16, c) < 0.3).float()
    head = build(name, d, c, make_context(c), **hparams)
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(4):
        loss = loss_fn(head(x), targets)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses.append(loss_fn(head(x), targets).item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0], losses  # one step lowers the loss
    assert losses[-1] < losses[0], losses
