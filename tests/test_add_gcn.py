"""ADD-GCN (SPEC §2) against a float64 reference written here from the release's equations
(Yejin0111/ADD-GCN models/add_gcn.py), the release's state-dict layout loading strictly, and the
BatchNorm of the global branch in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.api import registry
from bench.core.errors import UsageError

SIZES = [(1, 1), (3, 3), (7, 7), (14, 14), (2, 5), (14, 3), (1, 7)]


def leaky(a: np.ndarray) -> np.ndarray:
    return np.where(a > 0, a, 0.2 * a)


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def add_gcn_reference(x: np.ndarray, sd: dict[str, np.ndarray], bn_stats: str = "running") -> np.ndarray:
    """(out1 + out2) / 2 of the release, one image at a time except the global BatchNorm, which in
    training (``bn_stats = "batch"``) normalises over the batch with the biased variance."""
    b, d = x.shape[:2]
    w_fc = sd["fc.weight"][:, :, 0, 0]  # [C, d]
    w_t, b_t = sd["conv_transform.weight"][:, :, 0, 0], sd["conv_transform.bias"]  # [H, d]
    a_s = sd["gcn.static_adj.0.weight"][:, :, 0]  # [C, C]
    w_s, b_s = sd["gcn.static_weight.0.weight"][:, :, 0], sd["gcn.static_weight.0.bias"]
    w_g, b_g = sd["gcn.conv_global.weight"][:, :, 0], sd["gcn.conv_global.bias"]
    w_co, b_co = sd["gcn.conv_create_co_mat.weight"][:, :, 0], sd["gcn.conv_create_co_mat.bias"]  # [C, 2H]
    w_d, b_d = sd["gcn.dynamic_weight.weight"][:, :, 0], sd["gcn.dynamic_weight.bias"]
    w_l, b_l = sd["last_linear.weight"][:, :, 0], sd["last_linear.bias"]  # [C, H]
    mask = sd["mask_mat"]
    s1, v_all, vp_all, pre_bn = [], [], [], []
    for i in range(b):
        flat = x[i].reshape(d, -1)  # [d, N]
        m = w_fc @ flat  # [C, N]
        s1.append(m.max(axis=1))
        v = (w_t @ flat + b_t[:, None]) @ sigmoid(m).T  # [H, C]
        static = leaky(w_s @ leaky(a_s @ v.T).T + b_s[:, None])  # [H, C]
        vp = v + static
        pre_bn.append(w_g @ vp.mean(axis=1) + b_g)  # [H]
        v_all.append(v)
        vp_all.append(vp)
    pre_bn = np.stack(pre_bn)  # [B, H]
    if bn_stats == "batch":
        mean, var = pre_bn.mean(axis=0), pre_bn.var(axis=0)
    else:
        mean, var = sd["gcn.bn_global.running_mean"], sd["gcn.bn_global.running_var"]
    g_all = leaky((pre_bn - mean) / np.sqrt(var + 1e-5) * sd["gcn.bn_global.weight"] + sd["gcn.bn_global.bias"])
    out = np.zeros((b, w_fc.shape[0]))
    for i in range(b):
        v, vp = v_all[i], vp_all[i]
        g = np.repeat(g_all[i][:, None], v.shape[1], axis=1)  # [H, C]
        adj = sigmoid(w_co @ np.concatenate([g, vp]) + b_co[:, None])  # [C, C]
        z = leaky(w_d @ leaky(vp @ adj) + b_d[:, None])  # [H, C]
        o = w_l @ (v + z) + b_l[:, None]  # [C (outputs), C (nodes)]
        out[i] = (s1[i] + (o * mask).sum(axis=1)) / 2
    return out


def release_shapes(d: int, c: int, h: int) -> dict[str, tuple[int, ...]]:
    """The head keys of the release's ``ADD_GCN.state_dict()`` (all but ``features.*``), read off its
    module definitions: ``fc`` Conv2d(d, C, 1, bias=False); ``conv_transform`` Conv2d(d, H, 1);
    ``gcn`` = DynamicGraphConvolution(H, H, C) with ``static_adj`` Sequential(Conv1d(C, C, 1,
    bias=False), LeakyReLU), ``static_weight`` Sequential(Conv1d(H, H, 1), LeakyReLU),
    ``conv_global`` Conv1d(H, H, 1), ``bn_global`` BatchNorm1d(H), ``conv_create_co_mat``
    Conv1d(2H, C, 1), ``dynamic_weight`` Conv1d(H, H, 1); ``mask_mat`` Parameter(eye(C));
    ``last_linear`` Conv1d(H, C, 1)."""
    return {
        "fc.weight": (c, d, 1, 1),
        "conv_transform.weight": (h, d, 1, 1),
        "conv_transform.bias": (h,),
        "gcn.static_adj.0.weight": (c, c, 1),
        "gcn.static_weight.0.weight": (h, h, 1),
        "gcn.static_weight.0.bias": (h,),
        "gcn.conv_global.weight": (h, h, 1),
        "gcn.conv_global.bias": (h,),
        "gcn.bn_global.weight": (h,),
        "gcn.bn_global.bias": (h,),
        "gcn.bn_global.running_mean": (h,),
        "gcn.bn_global.running_var": (h,),
        "gcn.bn_global.num_batches_tracked": (),
        "gcn.conv_create_co_mat.weight": (c, 2 * h, 1),
        "gcn.conv_create_co_mat.bias": (c,),
        "gcn.dynamic_weight.weight": (h, h, 1),
        "gcn.dynamic_weight.bias": (h,),
        "mask_mat": (c, c),
        "last_linear.weight": (c, h, 1),
        "last_linear.bias": (c,),
    }


def release_state(d: int, c: int, h: int, seed: int) -> dict[str, torch.Tensor]:
    """A trained-looking release state: random weights at the fan-in scale, BN statistics away from
    (0, 1), mask = I (the release never changes it)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in release_shapes(d, c, h).items():
        if key == "mask_mat":
            out[key] = torch.eye(c, dtype=torch.float64)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(123)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
        elif key.endswith("bn_global.weight"):
            out[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            fan_in = shape[1] if len(shape) > 1 else max(h, 1)
            out[key] = torch.randn(shape, generator=gen, dtype=torch.float64) / np.sqrt(fan_in)
    return out


def numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in state.items()}


def build(d: int, c: int, h: int) -> torch.nn.Module:
    return registry.build_head("add_gcn", d, c, hidden_dim=h).double()


@pytest.mark.parametrize("d, c, h", [(12, 5, 8), (7, 1, 3)])
def test_add_gcn_matches_float64_reference_at_every_size(d: int, c: int, h: int) -> None:
    head = build(d, c, h).eval()
    state = release_state(d, c, h, seed=d + c)
    head.load_state_dict(state, strict=True)
    torch.manual_seed(1)
    for hh, ww in SIZES:
        x = torch.randn(2, d, hh, ww, dtype=torch.float64)
        with torch.no_grad():
            got = head(x).numpy()
        np.testing.assert_allclose(got, add_gcn_reference(x.numpy(), numpy_state(state)), rtol=1e-10, atol=1e-10, err_msg=f"{hh}x{ww}")


def test_add_gcn_at_the_release_width_matches_the_reference() -> None:
    """d = 2048, H = 1024 (the release's ResNet-101 head), C = 80 (COCO), 14 x 14 (448 px) and 2 x 5."""
    d, c, h = 2048, 80, 1024
    head = build(d, c, h).eval()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == release_shapes(d, c, h)
    state = release_state(d, c, h, seed=3)
    head.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(4)
    for hh, ww in [(14, 14), (2, 5)]:
        x = torch.relu(torch.randn(1, d, hh, ww, generator=gen, dtype=torch.float64))
        with torch.no_grad():
            got = head(x).numpy()
        np.testing.assert_allclose(got, add_gcn_reference(x.numpy(), numpy_state(state)), rtol=1e-9, atol=1e-9, err_msg=f"{hh}x{ww}")


def test_released_checkpoint_loads_strictly_once_the_backbone_is_dropped() -> None:
    """The release saves ``{"epoch", "model_name", "state_dict": model.module.state_dict(), "best_score"}``
    with the ResNet under ``features.*``; a mask other than I is honoured as the release's forward does."""
    d, c, h = 10, 4, 6
    head_state = release_state(d, c, h, seed=5)
    head_state["mask_mat"] = torch.rand(c, c, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    checkpoint = {
        "epoch": 40, "model_name": "ADD_GCN", "best_score": 0.842,
        "state_dict": {"features.0.weight": torch.zeros(64, 3, 7, 7), "features.1.running_mean": torch.zeros(64), **head_state},
    }
    loaded = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("features.")}
    head = build(d, c, h).eval()
    head.load_state_dict(loaded, strict=True)
    x = torch.rand(3, d, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        got = head(x).numpy()
    np.testing.assert_allclose(got, add_gcn_reference(x.numpy(), numpy_state(loaded)), rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="features"):
        build(d, c, h).load_state_dict(checkpoint["state_dict"], strict=True)


def test_training_mode_normalises_the_global_vector_over_the_batch() -> None:
    d, c, h = 9, 4, 5
    head = build(d, c, h).train()
    state = release_state(d, c, h, seed=7)
    head.load_state_dict(state, strict=True)
    x = torch.randn(4, d, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        got = head(x).numpy()
    np.testing.assert_allclose(got, add_gcn_reference(x.numpy(), numpy_state(state), bn_stats="batch"), rtol=1e-10, atol=1e-10)
    assert not np.allclose(got, add_gcn_reference(x.numpy(), numpy_state(state), bn_stats="running"))
    # and updates the running statistics, as BatchNorm1d does
    assert not torch.equal(head.gcn.bn_global.running_mean, state["gcn.bn_global.running_mean"])


def test_a_one_image_training_batch_uses_the_running_statistics_and_keeps_them() -> None:
    """The release drops the last incomplete batch; the harness keeps it, and BatchNorm cannot
    normalise one value per channel: that batch uses (and does not update) the running statistics."""
    d, c, h = 9, 4, 5
    head = build(d, c, h).train()
    state = release_state(d, c, h, seed=8)
    head.load_state_dict(state, strict=True)
    x = torch.randn(1, d, 2, 3, dtype=torch.float64)
    out = head(x)
    out.sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), add_gcn_reference(x.numpy(), numpy_state(state)), rtol=1e-10, atol=1e-10)
    assert torch.equal(head.gcn.bn_global.running_mean, state["gcn.bn_global.running_mean"])
    assert torch.equal(head.gcn.bn_global.running_var, state["gcn.bn_global.running_var"])
    assert head.gcn.bn_global.weight.grad is not None


def test_mask_is_saved_never_trained_and_stays_the_identity() -> None:
    torch.manual_seed(0)
    head = registry.build_head("add_gcn", 8, 5, hidden_dim=6)
    assert "mask_mat" in head.state_dict() and "mask_mat" not in dict(head.named_parameters())
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, weight_decay=0.1)
    for _ in range(3):
        loss = head(torch.randn(4, 8, 3, 3)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(head.mask_mat, torch.eye(5))


def test_release_parameter_count() -> None:
    """d 2048, H 1024, C 80: fc C·d, conv_transform H·d + H, static_adj C², three H×H convs with
    bias, BN 2H, co_mat 2H·C + C, last_linear C·H + C (mask_mat is not a parameter here)."""
    d, c, h = 2048, 80, 1024
    expected = c * d + (h * d + h) + c * c + 3 * (h * h + h) + 2 * h + (2 * h * c + c) + (c * h + c)
    with torch.device("meta"):
        head = registry.build_head("add_gcn", d, c, hidden_dim=h)
    assert sum(p.numel() for p in head.parameters()) == expected == 5_665_184


def test_bad_hidden_dim_is_a_usage_error_naming_the_file() -> None:
    with pytest.raises(UsageError, match="hidden_dim") as info:
        registry.build_head("add_gcn", 8, 3, hidden_dim=0)
    assert "heads/add_gcn.py" in str(info.value)


def test_sweep_and_description() -> None:
    cls = registry.head_class("add_gcn")
    assert cls.sweep == ({"hidden_dim": [256, 1024]},)
    assert not cls.reads_label_states
    assert cls.describe_hparams({"hidden_dim": 256}) == "H=256" and cls.describe_hparams({}) == "H=1024"
