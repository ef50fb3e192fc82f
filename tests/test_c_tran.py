"""C-Tran (SPEC §2) against a float64 reference written here from the release's equations
(QData/C-Tran models/CTran.py, models/transformer_layers.py, models/utils.py), the release's
state-dict layout loading strictly, label-state handling, and the label-mask-training draw
(bench.api.label_states, the release's get_unk_mask_indices) against the uniform laws it states."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from scipy import stats

from bench.api import draw_label_states, head_class, list_heads, max_known, registry
from bench.core.errors import UsageError

SIZES = [(1, 1), (3, 3), (7, 7), (14, 14), (2, 5), (14, 3), (1, 7)]
FEW_SIZES = [(1, 1), (14, 14), (2, 5)]


# ------------------------------------------------------------------------------------------------
# The reference (numpy, float64, one image at a time)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps) * w + b


def self_attention(e: np.ndarray, sd: dict[str, np.ndarray], p: str, heads: int) -> np.ndarray:
    """nn.MultiheadAttention(e, e, e) with its parameter layout: [S, D] -> [S, D]."""
    w, b = sd[p + "in_proj_weight"], sd[p + "in_proj_bias"]
    dim = w.shape[1]
    q, k, v = (e @ w[i * dim : (i + 1) * dim].T + b[i * dim : (i + 1) * dim] for i in range(3))
    dh = dim // heads
    out = np.zeros_like(e)
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(dh)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, cols] = (weights / weights.sum(axis=1, keepdims=True)) @ v[:, cols]
    return out @ sd[p + "out_proj.weight"].T + sd[p + "out_proj.bias"]


def c_tran_reference(x: np.ndarray, states: np.ndarray, sd: dict[str, np.ndarray], heads: int) -> np.ndarray:
    """The release's forward in eval mode: label embeddings plus state embeddings (custom_replace:
    -1 -> row 0, 0 -> row 1, 1 -> row 2), LayerNorm over [features ; labels], post-norm encoder
    layers (FFN width d, ReLU), diagonal of output_linear on the label tokens."""
    b, d = x.shape[:2]
    labels, state_rows = sd["label_lt.weight"], sd["known_label_lt.weight"]
    c = labels.shape[0]
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("self_attn_layers.")})
    out = np.zeros((b, c))
    for i in range(b):
        rows = np.select([states[i] == -1, states[i] == 0, states[i] == 1], [0, 1, 2], default=-99)
        u = labels + state_rows[rows]
        e = np.concatenate([x[i].reshape(d, -1).T, u])
        e = layer_norm(e, sd["LayerNorm.weight"], sd["LayerNorm.bias"])
        for layer in layers:
            p = f"self_attn_layers.{layer}.transformer_layer."
            e = layer_norm(e + self_attention(e, sd, p + "self_attn.", heads), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
            hidden = np.maximum(e @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"], 0.0)
            ff = hidden @ sd[p + "linear2.weight"].T + sd[p + "linear2.bias"]
            e = layer_norm(e + ff, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        full = e[-c:] @ sd["output_linear.weight"].T + sd["output_linear.bias"]  # [C, C]
        out[i] = np.diag(full)
    return out


def release_shapes(d: int, c: int, layers: int) -> dict[str, tuple[int, ...]]:
    """``CTranModel(num_labels=C, use_lmt=True, pos_emb=False, layers=L).state_dict()`` minus
    ``backbone.*``: ``label_lt`` Embedding(C, d), ``known_label_lt`` Embedding(3, d, padding_idx=0),
    ``self_attn_layers`` L x SelfAttnLayer -> ``transformer_layer`` (nn.MultiheadAttention(d, H)
    ``self_attn``, ``linear1`` Linear(d, d), ``linear2`` Linear(d, d), ``norm1``, ``norm2``),
    ``output_linear`` Linear(d, C), ``LayerNorm`` LayerNorm(d). (``label_input`` and the unused
    ``position_encoding`` are plain tensors, not in the state dict; ``downsample`` is False.)"""
    shapes = {"label_lt.weight": (c, d), "known_label_lt.weight": (3, d)}
    for i in range(layers):
        p = f"self_attn_layers.{i}.transformer_layer."
        shapes.update({
            p + "self_attn.in_proj_weight": (3 * d, d), p + "self_attn.in_proj_bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d), p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (d, d), p + "linear1.bias": (d,), p + "linear2.weight": (d, d), p + "linear2.bias": (d,),
            p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
        })
    shapes.update({"output_linear.weight": (c, d), "output_linear.bias": (c,), "LayerNorm.weight": (d,), "LayerNorm.bias": (d,)})
    return shapes


def release_state(d: int, c: int, layers: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in release_shapes(d, c, layers).items():
        value = torch.randn(shape, generator=gen, dtype=torch.float64)
        if "norm" in key.lower() and key.endswith("weight"):
            value = 1.0 + 0.2 * value
        elif len(shape) == 2 and "_lt" not in key:
            value = value / math.sqrt(shape[1])
        else:
            value = 0.3 * value
        out[key] = value
    return out


def numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in state.items()}


def build(d: int, c: int, layers: int, heads: int, **extra) -> torch.nn.Module:
    return registry.build_head("c_tran", d, c, num_layers=layers, num_heads=heads, **extra).double()


def random_states(b: int, c: int, seed: int) -> torch.Tensor:
    return torch.randint(-1, 2, (b, c), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Equal to the release


@pytest.mark.parametrize("d, c, layers, heads", [(12, 5, 3, 4), (8, 1, 1, 2), (6, 3, 2, 1)])
def test_c_tran_matches_float64_reference_at_every_size(d: int, c: int, layers: int, heads: int) -> None:
    head = build(d, c, layers, heads).eval()
    state = release_state(d, c, layers, seed=d + layers)
    head.load_state_dict(state, strict=True)
    sd = numpy_state(state)
    torch.manual_seed(2)
    for h, w in SIZES if layers == 3 else FEW_SIZES:
        x = torch.randn(2, d, h, w, dtype=torch.float64)
        label_state = random_states(2, c, h * 31 + w)
        with torch.no_grad():
            got_known, got_none = head(x, label_state).numpy(), head(x).numpy()
        np.testing.assert_allclose(got_known, c_tran_reference(x.numpy(), label_state.numpy(), sd, heads), rtol=1e-10, atol=1e-10, err_msg=f"{h}x{w}")
        unknown = np.full((2, c), -1)
        np.testing.assert_allclose(got_none, c_tran_reference(x.numpy(), unknown, sd, heads), rtol=1e-10, atol=1e-10, err_msg=f"{h}x{w}")


def test_c_tran_at_the_release_width_matches_the_reference() -> None:
    """d = 2048 (ResNet-101's channels, the release's hidden), 4 heads; one layer, C = 8 and a 2 x 3
    map keep the test fast (the layers repeat, and 3 layers are checked at the narrow widths)."""
    d, c, layers = 2048, 8, 1
    head = build(d, c, layers, 4).eval()
    state = release_state(d, c, layers, seed=11)
    head.load_state_dict(state, strict=True)
    x = torch.relu(torch.randn(1, d, 2, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64))
    label_state = random_states(1, c, 13)
    with torch.no_grad():
        got = head(x, label_state).numpy()
    np.testing.assert_allclose(got, c_tran_reference(x.numpy(), label_state.numpy(), numpy_state(state), 4), rtol=1e-9, atol=1e-9)


def test_release_shapes_and_parameter_count_at_coco_width() -> None:
    """d 2048, C 80, 3 layers: per layer 4d² + 4d (attention) + 2(d² + d) (feed-forward) + 4d (norms);
    label and state embeddings (C + 3)·d, output_linear C·d + C, the input LayerNorm 2d."""
    d, c, layers = 2048, 80, 3
    with torch.device("meta"):
        head = registry.build_head("c_tran", d, c)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == release_shapes(d, c, layers)
    expected = layers * (6 * d * d + 10 * d) + (c + 3) * d + c * d + c + 2 * d
    assert sum(p.numel() for p in head.parameters()) == expected == 75_896_912


def test_released_checkpoint_loads_strictly_once_backbone_and_module_are_dropped() -> None:
    """utils/logger.py saves ``{"epoch", "state_dict": model.state_dict(), "valid_mAP", ...}``; under
    DataParallel every key starts with ``module.``; the ResNet is ``backbone.base_network.*``."""
    d, c, layers = 8, 4, 3
    state = release_state(d, c, layers, seed=21)
    model_state = {"backbone.base_network.conv1.weight": torch.zeros(64, 3, 7, 7), **state}
    checkpoint = {"epoch": 7, "valid_mAP": 85.1, "state_dict": {f"module.{k}": v for k, v in model_state.items()}}
    loaded = {k[len("module.") :]: v for k, v in checkpoint["state_dict"].items() if not k.startswith("module.backbone.")}
    head = build(d, c, layers, 4).eval()
    head.load_state_dict(loaded, strict=True)
    x = torch.rand(3, d, 5, 2, dtype=torch.float64)
    label_state = random_states(3, c, 22)
    with torch.no_grad():
        got = head(x, label_state).numpy()
    np.testing.assert_allclose(got, c_tran_reference(x.numpy(), label_state.numpy(), numpy_state(loaded), 4), rtol=1e-10, atol=1e-10)


def test_the_opt_in_projection_maps_d_to_hidden_dim_first() -> None:
    """hidden_dim (not in the release): a 1x1 convolution d -> D, then the release's head at width D."""
    d, width, c, layers = 10, 8, 3, 2
    head = build(d, c, layers, 4, hidden_dim=width).eval()
    state = release_state(width, c, layers, seed=31)
    gen = torch.Generator().manual_seed(32)
    state["input_proj.weight"] = torch.randn(width, d, 1, 1, generator=gen, dtype=torch.float64) / math.sqrt(d)
    state["input_proj.bias"] = 0.1 * torch.randn(width, generator=gen, dtype=torch.float64)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    head.load_state_dict(state, strict=True)
    sd = numpy_state(state)
    x = torch.randn(2, d, 3, 4, dtype=torch.float64)
    projected = np.einsum("ed,bdhw->behw", sd["input_proj.weight"][:, :, 0, 0], x.numpy()) + sd["input_proj.bias"][None, :, None, None]
    label_state = random_states(2, c, 33)
    with torch.no_grad():
        got = head(x, label_state).numpy()
    np.testing.assert_allclose(got, c_tran_reference(projected, label_state.numpy(), sd, 4), rtol=1e-10, atol=1e-10)
    registry.build_head("c_tran", 130, 3, hidden_dim=64)  # any d once projected
    assert registry.head_class("c_tran").describe_hparams({"hidden_dim": 64}) == "L=3, H=4, D=64 (projected)"
    for bad, text in (({"hidden_dim": 0}, "hidden_dim"), ({"hidden_dim": 30}, "divisible by num_heads")):
        with pytest.raises(UsageError, match=text):
            registry.build_head("c_tran", 8, 3, **bad)


# ------------------------------------------------------------------------------------------------
# Label states in the head


def test_all_unknown_equals_none_and_a_known_state_changes_the_logits() -> None:
    torch.manual_seed(0)
    d, c = 16, 6
    head = registry.build_head("c_tran", d, c).eval()
    x = torch.randn(3, d, 4, 3)
    with torch.no_grad():
        none = head(x)
        unknown = head(x, torch.full((3, c), -1))
        assert torch.equal(none, unknown)
        assert torch.equal(head(x, torch.full((3, c), -1.0)), none)  # a float tensor of states reads the same
        for value in (0, 1):
            changed = torch.full((3, c), -1)
            changed[1, 2] = value
            out = head(x, changed)
            assert torch.equal(out[[0, 2]], none[[0, 2]])  # other images untouched
            assert not torch.allclose(out[1], none[1], atol=1e-4), value
        negative, positive = torch.full((3, c), -1), torch.full((3, c), -1)
        negative[0, 0], positive[0, 0] = 0, 1
        assert not torch.allclose(head(x, negative)[0], head(x, positive)[0], atol=1e-4)


def test_the_unknown_state_row_is_not_trained_and_not_zero() -> None:
    """The release's weights_init redraws the padding row of known_label_lt; padding_idx = 0 keeps
    it out of the gradient."""
    torch.manual_seed(0)
    d, c = 16, 5
    head = registry.build_head("c_tran", d, c, num_layers=1)
    rows = head.known_label_lt.weight
    bound = 1 / math.sqrt(d)
    assert rows[0].abs().max() > 0 and rows.abs().max() <= bound
    states = torch.tensor([[-1, 0, 1, -1, 0], [1, 1, -1, -1, 0]])
    head(torch.randn(2, d, 3, 3), states).sum().backward()
    grad = head.known_label_lt.weight.grad
    assert torch.equal(grad[0], torch.zeros(d)) and grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_initialisation_is_the_releases_weights_init() -> None:
    torch.manual_seed(3)
    d, c = 64, 7
    head = registry.build_head("c_tran", d, c, num_layers=2)
    bound = 1 / math.sqrt(d)
    layer = head.self_attn_layers[1].transformer_layer
    for linear in (layer.linear1, layer.linear2, layer.self_attn.out_proj, head.output_linear):
        for t in (linear.weight, linear.bias):
            assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound  # uniform on ±1/sqrt(d), bias too
    for emb in (head.label_lt, head.known_label_lt):
        assert emb.weight.abs().max() <= bound and emb.weight.std() > 0.5 * bound / math.sqrt(3)
    assert torch.equal(layer.self_attn.in_proj_bias, torch.zeros(3 * d))
    xavier = math.sqrt(6 / (d + 3 * d))
    assert layer.self_attn.in_proj_weight.abs().max() > bound and layer.self_attn.in_proj_weight.abs().max() <= xavier
    for norm in (head.LayerNorm, layer.norm1, layer.norm2):
        assert torch.equal(norm.weight, torch.ones(d)) and torch.equal(norm.bias, torch.zeros(d))


def test_bad_label_states_and_widths_are_clear_errors() -> None:
    head = registry.build_head("c_tran", 8, 3, num_layers=1)
    x = torch.randn(2, 8, 2, 2)
    with pytest.raises(ValueError, match="-1"):
        head(x, torch.tensor([[0, 2, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="-1"):
        head(x, torch.tensor([[0.5, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        head(x, torch.zeros(2, 4))
    with pytest.raises(UsageError, match="divisible by num_heads = 4") as info:
        registry.build_head("c_tran", 130, 3)  # d is the token width: 130 is not a multiple of 4
    assert "heads/c_tran.py" in str(info.value) and "hidden_dim" in str(info.value)
    registry.build_head("c_tran", 130, 3, num_heads=2)  # a divisor of 130 is fine
    for hparams, text in (({"num_layers": 0}, "num_layers"), ({"num_heads": 0}, "num_heads"), ({"dropout": 1.0}, "dropout")):
        with pytest.raises(UsageError, match=text):
            registry.build_head("c_tran", 8, 3, **hparams)


@pytest.mark.parametrize("name", [n for n in list_heads() if head_class(n).reads_label_states])
def test_every_head_that_reads_label_states_takes_none_drawn_and_all_unknown(name: str) -> None:
    """The contract of ``reads_label_states``: forward(x, label_state) with a drawn state, and
    all-unknown is the same as None (evaluation)."""
    torch.manual_seed(0)
    head = registry.build_head(name, 16, 5).eval()
    x = torch.randn(4, 16, 3, 5)
    targets = (torch.rand(4, 5) < 0.4).float()
    drawn = draw_label_states(targets, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert head(x, drawn).shape == (4, 5)
        assert torch.equal(head(x, torch.full((4, 5), -1)), head(x))


def test_only_c_tran_reads_label_states_and_the_contract_checks_the_signature() -> None:
    from torch import nn

    from bench.api.head import check_head_class

    from bench.core.paths import source_file

    # the project's heads (probe heads that other test modules register are not the project's)
    shipped = [n for n in list_heads() if source_file(head_class(n)).startswith("heads/")]
    assert [n for n in shipped if head_class(n).reads_label_states] == ["c_tran"]
    assert registry.head_class("c_tran").describe_hparams({}) == "L=3, H=4"

    class NoLabelArgument(nn.Module):
        reads_label_states = True

        def __init__(self, in_channels: int, num_classes: int, context=None) -> None:
            super().__init__()

        def forward(self, x):
            return x

    with pytest.raises(UsageError, match="label_state=None"):
        check_head_class("no_label_argument", NoLabelArgument)
    NoLabelArgument.reads_label_states = "yes"
    with pytest.raises(UsageError, match="True or False"):
        check_head_class("no_label_argument", NoLabelArgument)


# ------------------------------------------------------------------------------------------------
# The label-mask-training draw


def test_the_number_of_known_labels_is_uniform_on_0_to_floor_three_quarters_of_c() -> None:
    c, rows = 10, 35_000  # floor(7.5) = 7: eight equally likely counts
    targets = (torch.rand(rows, c, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    states = draw_label_states(targets, torch.Generator().manual_seed(1))
    known = (states != -1).sum(dim=1).numpy()
    counts = np.bincount(known, minlength=c + 1)
    assert counts[8:].sum() == 0 and (counts[:8] > 0).all()
    assert stats.chisquare(counts[:8]).pvalue > 1e-3
    for classes, most in ((1, 0), (2, 1), (3, 2), (4, 3), (5, 3), (80, 60)):
        assert max_known(classes) == most == int(classes * 0.75)  # the release's int(num_labels * 0.75)
        drawn = draw_label_states(torch.ones(2000, classes), torch.Generator().manual_seed(classes))
        assert (drawn != -1).sum(dim=1).max().item() == most


def test_the_known_subset_is_uniform_given_its_size() -> None:
    """C = 5 (at most 3 known): every k-subset equally likely for k = 1, 2, 3."""
    c, rows = 5, 40_000
    states = draw_label_states(torch.zeros(rows, c), torch.Generator().manual_seed(4))
    known = (states != -1).numpy()
    for k in (1, 2, 3):
        picked = known[known.sum(axis=1) == k]
        subsets = list(combinations(range(c), k))
        counts = [int((picked[:, list(s)].all(axis=1)).sum()) for s in subsets]
        assert sum(counts) == len(picked)
        assert stats.chisquare(counts).pvalue > 1e-3, (k, counts)


def test_known_labels_carry_their_targets_and_ignored_labels_stay_unknown() -> None:
    gen = torch.Generator().manual_seed(5)
    targets = (torch.rand(500, 12, generator=gen) < 0.5).float()
    ignore = torch.rand(500, 12, generator=gen) < 0.2
    states = draw_label_states(targets, torch.Generator().manual_seed(6), ignore=ignore)
    assert states.dtype == torch.int64 and states.shape == (500, 12)
    known = states != -1
    assert torch.equal(states[known].float(), targets[known])
    assert not known[ignore].any() and known.any()
    same_draw = draw_label_states(targets, torch.Generator().manual_seed(6))
    assert torch.equal(states, torch.where(ignore, torch.full_like(same_draw, -1), same_draw))


def test_the_draw_depends_only_on_the_generator_state() -> None:
    """Resume: a generator restored to a saved state (or reseeded as the epoch starts) draws the
    same states as the uninterrupted one."""
    targets = (torch.rand(16, 20, generator=torch.Generator().manual_seed(7)) < 0.3).float()
    gen = torch.Generator().manual_seed(123)
    first = draw_label_states(targets, gen)
    saved = gen.get_state()
    second = draw_label_states(targets, gen)
    restored = torch.Generator()
    restored.set_state(saved)
    assert torch.equal(draw_label_states(targets, restored), second)
    assert torch.equal(draw_label_states(targets, torch.Generator().manual_seed(123)), first)
    assert not torch.equal(first, second)
    # the draw does not touch the global generator (dropout draws stay those of a run without it)
    torch.manual_seed(9)
    before = torch.random.get_rng_state()
    draw_label_states(targets, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), before)
