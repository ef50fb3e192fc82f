"""ML-Decoder and Query2Label (SPEC §2) against float64 references written here from the equations
(not from the heads' code), released-layout state dicts that load strictly, and their errors."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.api import registry
from bench.core.errors import UsageError

SIZES = [(1, 1), (3, 3), (7, 7), (14, 14), (2, 5), (14, 3), (1, 7)]  # h = w in {1, 3, 7, 14} and non-square maps
FEW_SIZES = [(1, 1), (3, 3), (14, 14), (2, 5)]


# ------------------------------------------------------------------------------------------------
# Building blocks of the references (numpy, float64, one image at a time)


def layer_norm(x: np.ndarray, sd: dict[str, np.ndarray], prefix: str, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]


def attention(q_in: np.ndarray, k_in: np.ndarray, v_in: np.ndarray, sd: dict[str, np.ndarray], prefix: str, heads: int) -> np.ndarray:
    """Multi-head attention with nn.MultiheadAttention's parameter layout: [L, E], [S, E], [S, E] -> [L, E]."""
    w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
    e = w.shape[1]
    q = q_in @ w[:e].T + b[:e]
    k = k_in @ w[e : 2 * e].T + b[e : 2 * e]
    v = v_in @ w[2 * e :].T + b[2 * e :]
    dh = e // heads
    out = np.zeros((q.shape[0], e))
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(dh)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[:, cols] = weights @ v[:, cols]
    return out @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def ffn(x: np.ndarray, sd: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    hidden = np.maximum(x @ sd[prefix + "linear1.weight"].T + sd[prefix + "linear1.bias"], 0.0)
    return hidden @ sd[prefix + "linear2.weight"].T + sd[prefix + "linear2.bias"]


def numpy_state(module_or_dict) -> dict[str, np.ndarray]:
    items = module_or_dict.state_dict().items() if isinstance(module_or_dict, nn.Module) else module_or_dict.items()
    return {k: v.detach().double().numpy() for k, v in items}


# ------------------------------------------------------------------------------------------------
# ML-Decoder


def ml_decoder_reference(x: np.ndarray, sd: dict[str, np.ndarray], num_classes: int, heads: int) -> np.ndarray:
    """SPEC §2 / the issue's description: tokens = ReLU(Linear(x)); q = LN1(Q + Q); cross-attention,
    residual, LN2; feed-forward, residual, LN3; query k -> its own [E, g] matrix; first C; + bias."""
    b, d = x.shape[:2]
    out = np.zeros((b, num_classes))
    queries = sd["decoder.query_embed.weight"]  # [K, E]
    pooling = sd["decoder.duplicate_pooling"]  # [K, E, g]
    layer = "decoder.layers.0."
    for i in range(b):
        tokens = np.maximum(x[i].reshape(d, -1).T @ sd["decoder.embed_standart.weight"].T + sd["decoder.embed_standart.bias"], 0.0)
        q = layer_norm(queries + queries, sd, layer + "norm1.")  # the release's tgt + dropout(tgt), eval
        u = layer_norm(q + attention(q, tokens, tokens, sd, layer + "multihead_attn.", heads), sd, layer + "norm2.")
        o = layer_norm(u + ffn(u, sd, layer), sd, layer + "norm3.")  # [K, E]
        grouped = np.concatenate([o[k] @ pooling[k] for k in range(queries.shape[0])])  # [K * g], query-major
        out[i] = grouped[:num_classes] + sd["decoder.duplicate_pooling_bias"]
    return out


def ml_decoder_release_shapes(d: int, c: int, k: int, e: int, f: int) -> dict[str, tuple[int, ...]]:
    """The head keys of a released ML-Decoder checkpoint (src_files/ml_decoder/ml_decoder.py:
    ``MLDecoder.decoder`` is an ``nn.TransformerDecoder`` of one ``TransformerDecoderLayerOptimal``
    plus the attributes set on it), with their shapes."""
    g = math.ceil(c / k)
    layer = "decoder.layers.0."
    shapes = {
        "decoder.embed_standart.weight": (e, d),
        "decoder.embed_standart.bias": (e,),
        "decoder.query_embed.weight": (k, e),
        layer + "multihead_attn.in_proj_weight": (3 * e, e),
        layer + "multihead_attn.in_proj_bias": (3 * e,),
        layer + "multihead_attn.out_proj.weight": (e, e),
        layer + "multihead_attn.out_proj.bias": (e,),
        layer + "linear1.weight": (f, e),
        layer + "linear1.bias": (f,),
        layer + "linear2.weight": (e, f),
        layer + "linear2.bias": (e,),
        "decoder.duplicate_pooling": (k, e, g),
        "decoder.duplicate_pooling_bias": (c,),
    }
    for norm in ("norm1", "norm2", "norm3"):
        shapes[f"{layer}{norm}.weight"] = (e,)
        shapes[f"{layer}{norm}.bias"] = (e,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen) + (1.0 if k.endswith("norm1.weight") else 0.0) for k, s in shapes.items()}


@pytest.mark.parametrize("num_groups", [-1, 1, 4, 20])
def test_ml_decoder_matches_float64_reference_at_every_size(num_groups: int) -> None:
    torch.manual_seed(num_groups + 10)
    d, c, e, heads = 12, 9, 16, 4
    head = registry.build_head("ml_decoder", d, c, num_groups=num_groups, embed_dim=e, num_heads=heads, ff_dim=24).double().eval()
    sd = numpy_state(head)
    k = sd["decoder.query_embed.weight"].shape[0]
    assert k == (min(100, c) if num_groups == -1 else min(num_groups, c))
    assert sd["decoder.duplicate_pooling"].shape == (k, e, math.ceil(c / k))
    for h, w in SIZES if num_groups == -1 else FEW_SIZES:
        x = torch.randn(2, d, h, w, dtype=torch.float64)
        with torch.no_grad():
            got = head(x).numpy()
        np.testing.assert_allclose(got, ml_decoder_reference(x.numpy(), sd, c, heads), rtol=1e-10, atol=1e-10, err_msg=f"{h}x{w}")


def test_ml_decoder_released_state_dict_loads_strictly_and_computes_the_release() -> None:
    """A checkpoint laid out as the release saves it (TResNet: the head under ``head.``, here with
    backbone keys around it), the prefix stripped, loads with strict=True."""
    d, c, k, e, f, heads = 20, 11, 4, 16, 32, 8
    shapes = ml_decoder_release_shapes(d, c, k, e, f)
    checkpoint = {"body.conv1.weight": torch.zeros(8, 3, 3, 3), **{f"head.{key}": v for key, v in random_state(shapes, 1).items()}}
    head_state = {key[len("head.") :]: v for key, v in checkpoint.items() if key.startswith("head.")}
    head = registry.build_head("ml_decoder", d, c, num_groups=k, embed_dim=e, num_heads=heads, ff_dim=f).double().eval()
    assert {key: tuple(v.shape) for key, v in head.state_dict().items()} == shapes
    head.load_state_dict(head_state, strict=True)
    x = torch.rand(3, d, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        got = head(x).numpy()
    np.testing.assert_allclose(got, ml_decoder_reference(x.numpy(), numpy_state(head_state), c, heads), rtol=1e-10, atol=1e-10)


def test_ml_decoder_release_width_has_the_release_shapes() -> None:
    """The release's width (E 768, F 2048) and K = min(100, C) for COCO (C = 80) on a 2048-d map."""
    with torch.device("meta"):
        head = registry.build_head("ml_decoder", 2048, 80, embed_dim=768, ff_dim=2048)
    assert {key: tuple(v.shape) for key, v in head.state_dict().items()} == ml_decoder_release_shapes(2048, 80, 80, 768, 2048)


def test_ml_decoder_queries_are_saved_but_never_trained() -> None:
    torch.manual_seed(0)
    head = registry.build_head("ml_decoder", 8, 5, embed_dim=16, num_heads=2, ff_dim=16)
    before = head.decoder.query_embed.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1)
    loss = head(torch.randn(4, 8, 3, 3)).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert not head.decoder.query_embed.weight.requires_grad and head.decoder.query_embed.weight.grad is None
    assert torch.equal(head.decoder.query_embed.weight, before)
    assert "decoder.query_embed.weight" in head.state_dict()


# ------------------------------------------------------------------------------------------------
# Query2Label


@functools.lru_cache(maxsize=None)
def sine_reference(h: int, w: int, dim: int) -> np.ndarray:
    """DETR's PositionEmbeddingSine(dim/2, normalize=True, temperature 10000) written out: [dim, h, w]."""
    half = dim // 2
    out = np.zeros((dim, h, w))
    for i in range(h):
        for j in range(w):
            y = (i + 1) / (h + 1e-6) * 2 * math.pi
            x = (j + 1) / (w + 1e-6) * 2 * math.pi
            for m in range(half):
                tau = 10000.0 ** (2 * (m // 2) / half)
                out[m, i, j] = math.sin(y / tau) if m % 2 == 0 else math.cos(y / tau)
                out[half + m, i, j] = math.sin(x / tau) if m % 2 == 0 else math.cos(x / tau)
    return out


def q2l_reference(x: np.ndarray, sd: dict[str, np.ndarray], args: dict, heads: int) -> np.ndarray:
    """The DETR-style transformer of SPEC §2 for one configuration (args as the release names them)."""
    b, d, h, w = x.shape
    dim = sd["query_embed.weight"].shape[1]
    pos = sine_reference(h, w, dim).reshape(dim, -1).T  # [N, D]
    labels = sd["query_embed.weight"]  # [C, D]
    pre = args.get("pre_norm", False)
    out = np.zeros((b, labels.shape[0]))
    for i in range(b):
        flat = x[i].reshape(d, -1)
        if args.get("keep_input_proj", True):
            s = (sd["input_proj.weight"][:, :, 0, 0] @ flat).T + sd["input_proj.bias"]
        else:
            s = flat.T.copy()
        for layer in range(args["enc_layers"]):
            p = f"transformer.encoder.layers.{layer}."
            if pre:
                u = layer_norm(s, sd, p + "norm1.")
                s = s + attention(u + pos, u + pos, u, sd, p + "self_attn.", heads)
                s = s + ffn(layer_norm(s, sd, p + "norm2."), sd, p)
            else:
                s = layer_norm(s + attention(s + pos, s + pos, s, sd, p + "self_attn.", heads), sd, p + "norm1.")
                s = layer_norm(s + ffn(s, sd, p), sd, p + "norm2.")
        if pre and args["enc_layers"]:
            s = layer_norm(s, sd, "transformer.encoder.norm.")
        t = np.zeros_like(labels)
        for layer in range(args["dec_layers"]):
            p = f"transformer.decoder.layers.{layer}."
            self_attn = args.get("keep_first_self_attn_dec", False) if layer == 0 else args.get("keep_other_self_attn_dec", False)
            if pre:
                if self_attn:
                    u = layer_norm(t, sd, p + "norm1.")
                    t = t + attention(u + labels, u + labels, u, sd, p + "self_attn.", heads)
                t = t + attention(layer_norm(t, sd, p + "norm2.") + labels, s + pos, s, sd, p + "multihead_attn.", heads)
                t = t + ffn(layer_norm(t, sd, p + "norm3."), sd, p)
            else:
                if self_attn:
                    t = layer_norm(t + attention(t + labels, t + labels, t, sd, p + "self_attn.", heads), sd, p + "norm1.")
                t = layer_norm(t + attention(t + labels, s + pos, s, sd, p + "multihead_attn.", heads), sd, p + "norm2.")
                t = layer_norm(t + ffn(t, sd, p), sd, p + "norm3.")
        o = layer_norm(t, sd, "transformer.decoder.norm.")
        out[i] = (sd["fc.W"][0] * o).sum(axis=1) + sd["fc.b"][0]
    return out


def q2l_release_shapes(d: int, c: int, args: dict) -> dict[str, tuple[int, ...]]:
    """The keys of a released Query2Label model minus ``backbone.*`` (lib/models/query2label.py and
    transformer.py: DETR's Transformer with the decoder self-attention deleted where not kept,
    GroupWiseLinear ``fc``), with their shapes."""
    dim, ff = args["hidden_dim"], args["dim_feedforward"]
    shapes: dict[str, tuple[int, ...]] = {}

    def attn(prefix: str) -> None:
        shapes.update({prefix + "in_proj_weight": (3 * dim, dim), prefix + "in_proj_bias": (3 * dim,),
                       prefix + "out_proj.weight": (dim, dim), prefix + "out_proj.bias": (dim,)})

    def norm(prefix: str) -> None:
        shapes.update({prefix + "weight": (dim,), prefix + "bias": (dim,)})

    def feed_forward(prefix: str) -> None:
        shapes.update({prefix + "linear1.weight": (ff, dim), prefix + "linear1.bias": (ff,),
                       prefix + "linear2.weight": (dim, ff), prefix + "linear2.bias": (dim,)})

    for i in range(args["enc_layers"]):
        p = f"transformer.encoder.layers.{i}."
        attn(p + "self_attn.")
        feed_forward(p)
        norm(p + "norm1.")
        norm(p + "norm2.")
    if args.get("pre_norm", False):
        norm("transformer.encoder.norm.")
    for i in range(args["dec_layers"]):
        p = f"transformer.decoder.layers.{i}."
        if args.get("keep_first_self_attn_dec", False) if i == 0 else args.get("keep_other_self_attn_dec", False):
            attn(p + "self_attn.")
            norm(p + "norm1.")
        attn(p + "multihead_attn.")
        feed_forward(p)
        norm(p + "norm2.")
        norm(p + "norm3.")
    norm("transformer.decoder.norm.")
    if args.get("keep_input_proj", True):
        shapes.update({"input_proj.weight": (dim, d, 1, 1), "input_proj.bias": (dim,)})
    shapes.update({"query_embed.weight": (c, dim), "fc.W": (1, c, dim), "fc.b": (1, c)})
    return shapes


Q2L_CONFIGS = [
    dict(hidden_dim=16, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=24),  # the released structure
    dict(hidden_dim=16, nheads=4, enc_layers=0, dec_layers=1, dim_feedforward=8),
    dict(hidden_dim=12, nheads=3, enc_layers=2, dec_layers=3, dim_feedforward=20, keep_first_self_attn_dec=True),
    dict(hidden_dim=16, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=24, keep_first_self_attn_dec=True, keep_other_self_attn_dec=True, pre_norm=True),
    dict(hidden_dim=16, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=24, pre_norm=True),  # a layer without self-attention skips it
    dict(hidden_dim=8, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=16, keep_input_proj=False),
]


@pytest.mark.parametrize("args", Q2L_CONFIGS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_query2label_matches_float64_reference_at_every_size(args: dict) -> None:
    torch.manual_seed(args["hidden_dim"] + args["enc_layers"])
    d = args["hidden_dim"] if args.get("keep_input_proj", True) is False else 10
    c = 6
    head = registry.build_head("query2label", d, c, **args).double().eval()
    sd = numpy_state(head)
    assert {k: v.shape for k, v in sd.items()} == q2l_release_shapes(d, c, args)
    for h, w in SIZES if args is Q2L_CONFIGS[0] else FEW_SIZES:
        x = torch.randn(2, d, h, w, dtype=torch.float64)
        with torch.no_grad():
            got = head(x).numpy()
        np.testing.assert_allclose(got, q2l_reference(x.numpy(), sd, args, args["nheads"]), rtol=1e-9, atol=1e-9, err_msg=f"{h}x{w}")


def test_query2label_released_state_dict_loads_strictly_and_computes_the_release() -> None:
    """A checkpoint as main_mlc.py saves it ({'state_dict': DDP model}: ``module.`` prefixes, the
    backbone and its position-embedding buffer under ``backbone.``): drop ``backbone.*``, strip
    ``module.``, and the head loads with strict=True."""
    d, c = 24, 7
    args = dict(hidden_dim=16, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=32)
    shapes = q2l_release_shapes(d, c, args)
    model_state = {"backbone.0.body.conv1.weight": torch.zeros(4, 3, 7, 7), "backbone.1.pe": torch.zeros(1, 16, 14, 14)}
    model_state.update(random_state(shapes, 2))
    checkpoint = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model_state.items()}}
    head_state = {k[len("module.") :]: v for k, v in checkpoint["state_dict"].items() if not k.startswith("module.backbone.")}
    head = registry.build_head("query2label", d, c, **args).double().eval()
    head.load_state_dict(head_state, strict=True)
    x = torch.rand(2, d, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        got = head(x).numpy()
    np.testing.assert_allclose(got, q2l_reference(x.numpy(), numpy_state(head_state), args, 4), rtol=1e-9, atol=1e-9)


def test_query2label_position_embedding_at_the_released_map_size_and_others() -> None:
    """The release precomputes it for one map (448 / 32 = 14); here every h, w works."""
    module = __import__("sys").modules[registry.head_class("query2label").__module__]
    for h, w, dim in [(14, 14, 64), (1, 1, 8), (3, 7, 16), (7, 2, 2048)]:
        got = module.sine_position_embedding(h, w, dim).double().numpy()
        np.testing.assert_allclose(got, sine_reference(h, w, dim), rtol=0, atol=1e-12, err_msg=f"{h}x{w}x{dim}")


def test_query2label_released_r101_setting_costs_155_6_million_parameters() -> None:
    """hidden 2048, ff 8192, 4 heads, 1 + 2 layers, on ResNet-101's 2048 channels, C = 80: counted
    from the shapes (4D² + 4D per attention, 2DF + F + D per feed-forward, 2D per norm)."""
    d, c, dim, ff = 2048, 80, 2048, 8192
    attn, feed, norm = 4 * dim * dim + 4 * dim, 2 * dim * ff + ff + dim, 2 * dim
    expected = (attn + feed + 2 * norm) + 2 * (attn + feed + 2 * norm) + norm + (dim * d + dim) + c * dim + (c * dim + c)
    with torch.device("meta"):
        head = registry.build_head("query2label", d, c, hidden_dim=dim, dim_feedforward=ff, nheads=4, enc_layers=1, dec_layers=2)
    assert sum(p.numel() for p in head.parameters()) == expected == 155_603_024


# ------------------------------------------------------------------------------------------------
# Both


@pytest.mark.parametrize("name", ["ml_decoder", "query2label"])
def test_defaults_shapes_and_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    head = registry.build_head(name, 32, 6)
    for h, w in FEW_SIZES:
        out = head(torch.randn(2, 32, h, w))
        assert out.shape == (2, 6) and torch.isfinite(out).all()
    clone = registry.build_head(name, 32, 6)
    clone.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(3, 32, 4, 4)
    head.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(head(x), clone(x))


@pytest.mark.parametrize("name", ["ml_decoder", "query2label"])
def test_optimisation_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    d, c = 32, 6
    x = torch.relu(torch.randn(16, d, 5, 5))
    targets = (torch.rand(16, c) < 0.3).float()
    head = registry.build_head(name, d, c)
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(4):
        loss = loss_fn(head(x), targets)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[1] < losses[0] and min(losses[1:]) < losses[0], losses


@pytest.mark.parametrize(
    "name, hparams, text",
    [
        ("ml_decoder", {"num_groups": 0}, "num_groups"),
        ("ml_decoder", {"num_groups": -3}, "num_groups"),
        ("ml_decoder", {"embed_dim": 30, "num_heads": 8}, "divisible"),
        ("ml_decoder", {"dropout": 1.0}, "dropout"),
        ("query2label", {"hidden_dim": 30}, "multiple of 4"),
        ("query2label", {"hidden_dim": 24, "nheads": 5}, "nheads"),
        ("query2label", {"dec_layers": 0}, "dec_layers"),
        ("query2label", {"enc_layers": -1}, "enc_layers"),
        ("query2label", {"keep_input_proj": False, "hidden_dim": 64}, "keep_input_proj"),
        ("query2label", {"pre_norm": "yes"}, "pre_norm"),
    ],
)
def test_bad_hyper_parameters_are_usage_errors_naming_the_file(name: str, hparams: dict, text: str) -> None:
    with pytest.raises(UsageError, match=text) as info:
        registry.build_head(name, 32, 6, **hparams)
    assert f"heads/{name}.py" in str(info.value)


def test_declared_sweeps_name_real_values() -> None:
    mld, q2l = registry.head_class("ml_decoder"), registry.head_class("query2label")
    assert {"num_groups": [1, 5, 10, -1]} in mld.sweep and {"dec_layers": [1, 2, 3]} in q2l.sweep
    assert mld.describe_hparams({"num_groups": -1}) == "K=min(100,C), E=128"
    assert mld.describe_hparams({"embed_dim": 768, "ff_dim": 2048}) == "K=min(100,C), E=768, ff_dim=2048"
    assert q2l.describe_hparams({"hidden_dim": 256, "dec_layers": 3}) == "D=256, 1+3 layers"


class _EncoderLayerAsBefore(nn.Module):
    """The encoder layer as Query2Label and C-Tran wrote it before bench.api.layers held it (same
    names and parameter order): queries and keys add the embedding each on their own."""

    def __init__(self, dim: int, heads: int, ff: int, pre_norm: bool) -> None:
        super().__init__()
        from bench.api import MultiheadAttention

        self.pre_norm = pre_norm
        self.self_attn = MultiheadAttention(dim, heads, 0.1)
        self.linear1, self.dropout, self.linear2 = nn.Linear(dim, ff), nn.Dropout(0.1), nn.Linear(ff, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        ffn = lambda u: self.linear2(self.dropout(torch.relu(self.linear1(u))))  # noqa: E731
        if pos is None:
            src = self.norm1(src + self.dropout1(self.self_attn(src, src, src)))
            return self.norm2(src + self.dropout2(ffn(src)))
        if self.pre_norm:
            u = self.norm1(src)
            src = src + self.dropout1(self.self_attn(u + pos, u + pos, u))
            return src + self.dropout2(ffn(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, src + pos, src)))
        return self.norm2(src + self.dropout2(ffn(src)))


@pytest.mark.parametrize(("pre_norm", "with_pos"), [(False, True), (True, True), (False, False)])
def test_shared_encoder_layer_trains_bit_for_bit_as_before(pre_norm: bool, with_pos: bool) -> None:
    """bench.api.TransformerEncoderLayer replaced two copies of this layer; a run's numbers may not
    move (issue 23): same initialisation from a seed, and the same outputs AND gradients to the
    last bit, in training mode (dropout drawn from the same seed). Summing the embedding once for
    queries and keys changes the input gradient's accumulation order, which this catches."""
    from bench.api import TransformerEncoderLayer

    torch.manual_seed(0)
    before = _EncoderLayerAsBefore(32, 4, 64, pre_norm)
    torch.manual_seed(0)
    shared = TransformerEncoderLayer(32, 4, 64, 0.1, pre_norm)
    assert [n for n, _ in before.named_parameters()] == [n for n, _ in shared.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), shared.parameters()))
    x = torch.randn(3, 10, 32)
    pos = torch.randn(10, 32) if with_pos else None
    results = []
    for layer in (before, shared):
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        out = layer(xx, pos)
        out.square().mean().backward()
        results.append((out.detach(), xx.grad, [p.grad for p in layer.parameters()]))
    (out_a, dx_a, dp_a), (out_b, dx_b, dp_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert all(torch.equal(a, b) for a, b in zip(dp_a, dp_b))
