"""Query2Label: a DETR-style transformer whose C label embeddings query the feature map (SPEC §2;
Liu et al., "Query2Label: A Simple Transformer Way to Multi-Label Classification", 2021;
SlongLiu/query2labels).

Shapes: x [B, d, h, w] (any h, w >= 1), N = h*w positions, C classes, D = ``hidden_dim``,
F = ``dim_feedforward``; ``MHA(q, k, v)`` is standard multi-head attention with ``nheads`` heads.

    s   = Conv1x1_{d->D}(x), flattened                 tokens (``keep_input_proj``)      [B, N, D]
    P   = sine position embedding of the h x w grid     D/2 features per axis (below)     [N, D]
    encoder (``enc_layers`` layers; post-norm):
        s = LN₁(s + Dropout(MHA(s + P, s + P, s)))
        s = LN₂(s + Dropout(FFN(s)))                    FFN(u) = W₂ Dropout(ReLU(W₁ u + b₁)) + b₂
    decoder (``dec_layers`` layers) from t = 0, label embeddings E [C, D] as query positions:
        [t = LN₁(t + Dropout(MHA(t + E, t + E, t)))]    self-attention: only in the layers kept
                                                        (``keep_first_self_attn_dec`` / ``keep_other_self_attn_dec``;
                                                        both False as released: no self-attention)
        t = LN₂(t + Dropout(MHA(t + E, s + P, s)))      cross-attention to the encoder memory
        t = LN₃(t + Dropout(FFN(t)))
    o   = LN_dec(t)                                     final decoder norm                [B, C, D]
    y_c = W_c · o_c + b_c                               per-class linear (GroupWiseLinear) [B, C]

With ``pre_norm`` each sub-layer is ``u + Dropout(f(LN(u)))`` instead and the encoder ends with
its own LayerNorm (``transformer.encoder.norm``), as in DETR. The release's pre-norm decoder layer
uses its self-attention block unconditionally, so it crashes whenever a self-attention module was
removed; here a layer without self-attention simply skips that block.

Position embedding (DETR's ``PositionEmbeddingSine(D/2, normalize=True)``, temperature 10000):
row i = 1..h, column j = 1..w, ``ŷ = i / (h + 1e-6) · 2π``, ``x̂ = j / (w + 1e-6) · 2π``;
``τ_m = 10000^(2⌊m/2⌋ / (D/2))`` for m = 0 .. D/2-1; feature m of an axis is ``sin(· / τ_m)`` for
even m and ``cos(· / τ_m)`` for odd m; P = [y features, x features]. The release precomputes it
for one map size (``img_size / 32``); here it is computed (and cached) for every h, w >= 1.
D must be a multiple of 4 (D/2 features per axis, in sin/cos pairs) and of ``nheads``.

State dict: the release's model keys minus ``backbone.*`` with the same shapes:
``input_proj.{weight [D, d, 1, 1], bias [D]}`` (absent without ``keep_input_proj``),
``query_embed.weight [C, D]``, ``fc.W [1, C, D]``, ``fc.b [1, C]``,
``transformer.encoder.layers.i.{self_attn.*, linear1.*, linear2.*, norm1.*, norm2.*}``,
``transformer.encoder.norm.*`` (``pre_norm`` only), ``transformer.decoder.layers.i.{[self_attn.*,
norm1.*], multihead_attn.*, linear1.*, linear2.*, norm2.*, norm3.*}``, ``transformer.decoder.norm.*``;
attention parameters under ``nn.MultiheadAttention``'s names. A released checkpoint's head loads
with ``load_state_dict(strict=True)`` once its ``backbone.*`` keys are dropped (and ``module.``
stripped).

Defaults are sized for a CPU benchmark: D = 128, F = 512 (the release's F/D = 4), 4 heads, 1
encoder + 2 decoder layers, dropout 0.1 (on tiny_cnn's 8 x 8 x 128 maps: 48 MFLOPs per image,
1.8x the backbone). The released R101 setting is D = 2048, F = 8192, 4 heads, 1 + 2 layers: 155.6 M
parameters and 41.9 GFLOPs per 448 px image at d = 2048, C = 80 (docs/heads.md). Initialisation as released: Xavier
uniform for every transformer matrix, zero attention biases, ``nn.Linear`` / ``nn.Conv2d`` defaults
elsewhere, label embeddings N(0, 1), ``fc`` uniform in ±1/sqrt(D).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bench.api import FeedForwardLayer, Head, HeadContext, MultiheadAttention, TransformerEncoderLayer, hparam_specs, register_head

TEMPERATURE = 10000.0
NORM_EPS = 1e-6  # the release's eps in the normalised coordinates


def sine_position_embedding(h: int, w: int, dim: int, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The normalised 2-D sine embedding of an h x w grid: [dim, h, w], computed in float64 (the
    release computes it in float32; the difference is below 1e-6); dim % 4 == 0."""
    half = dim // 2
    y = torch.arange(1, h + 1, dtype=torch.float64) / (h + NORM_EPS) * 2 * math.pi  # [h]
    x = torch.arange(1, w + 1, dtype=torch.float64) / (w + NORM_EPS) * 2 * math.pi  # [w]
    m = torch.arange(half, dtype=torch.float64)
    tau = temperature ** (2 * torch.div(m, 2, rounding_mode="floor") / half)  # [D/2]

    def axis(coords: torch.Tensor) -> torch.Tensor:  # [n] -> [n, D/2], sin on even m, cos on odd m
        angles = coords[:, None] / tau
        return torch.where(m.to(torch.long) % 2 == 0, angles.sin(), angles.cos())

    pos_y = axis(y)[:, None, :].expand(h, w, half)
    pos_x = axis(x)[None, :, :].expand(h, w, half)
    return torch.cat([pos_y, pos_x], dim=2).permute(2, 0, 1).contiguous()  # [D, h, w]


class DecoderLayer(FeedForwardLayer):
    """DETR's decoder layer, with the self-attention block (``self_attn``, ``norm1``) optional."""

    def __init__(self, dim: int, nheads: int, ff: int, dropout: float, pre_norm: bool, self_attention: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.has_self_attn = self_attention
        if self_attention:
            self.self_attn = MultiheadAttention(dim, nheads, dropout)
            self.norm1 = nn.LayerNorm(dim)
            self.dropout1 = nn.Dropout(dropout)
        self.multihead_attn = MultiheadAttention(dim, nheads, dropout)
        self.add_feed_forward(dim, ff, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt [B, C, D], memory [B, N, D], pos [N, D], query_pos [C, D] -> [B, C, D]."""
        key = memory + pos
        if self.pre_norm:
            if self.has_self_attn:
                u = self.norm1(tgt)
                tgt = tgt + self.dropout1(self.self_attn(u + query_pos, u + query_pos, u))
            tgt = tgt + self.dropout2(self.multihead_attn(self.norm2(tgt) + query_pos, key, memory))
            return tgt + self.dropout3(self.feed_forward(self.norm3(tgt)))
        if self.has_self_attn:
            tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt + query_pos, tgt + query_pos, tgt)))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(tgt + query_pos, key, memory)))
        return self.norm3(tgt + self.dropout3(self.feed_forward(tgt)))


class Encoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer], norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class Decoder(nn.Module):
    def __init__(self, layers: list[DecoderLayer], norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class Transformer(nn.Module):
    """The encoder-decoder under the release's names (``transformer.encoder.*``, ``transformer.decoder.*``)."""

    def __init__(
        self, dim: int, nheads: int, enc_layers: int, dec_layers: int, ff: int, dropout: float, pre_norm: bool,
        keep_first_self_attn: bool, keep_other_self_attn: bool,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            [TransformerEncoderLayer(dim, nheads, ff, dropout, pre_norm) for _ in range(enc_layers)],
            nn.LayerNorm(dim) if pre_norm else None,
        )
        self.decoder = Decoder(
            [
                DecoderLayer(dim, nheads, ff, dropout, pre_norm, keep_first_self_attn if i == 0 else keep_other_self_attn)
                for i in range(dec_layers)
            ],
            nn.LayerNorm(dim),
        )
        for p in self.parameters():  # the release's _reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """src [B, N, D], pos [N, D], query_pos [C, D] -> decoder output [B, C, D]."""
        memory = src
        if len(self.encoder.layers):
            for layer in self.encoder.layers:
                memory = layer(memory, pos)
            if self.encoder.norm is not None:
                memory = self.encoder.norm(memory)
        tgt = src.new_zeros(src.shape[0], query_pos.shape[0], src.shape[2])
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.decoder.norm(tgt)


class GroupWiseLinear(nn.Module):
    """Per-class linear map: o [B, C, D] -> y_c = W_c · o_c + b_c, [B, C]; ``W [1, C, D]``, ``b [1, C]``."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.W = nn.Parameter(torch.empty(1, num_classes, dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(1, num_classes).uniform_(-bound, bound))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return (self.W * o).sum(-1) + self.b


@register_head("query2label")
class Query2LabelHead(Head):
    """Query2Label: label embeddings decode a transformer-encoded feature map; per-class linear."""

    sweep = (
        {"dec_layers": [1, 2, 3]},  # decoder depth at the default width (D = 128)
        {"hidden_dim": [64, 256]},  # width at the default depth (1 + 2 layers)
    )

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        context: HeadContext | None = None,
        *,
        hidden_dim: int = 128,
        nheads: int = 4,
        enc_layers: int = 1,
        dec_layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
        pre_norm: bool = False,
        keep_first_self_attn_dec: bool = False,
        keep_other_self_attn_dec: bool = False,
        keep_input_proj: bool = True,
    ) -> None:
        super().__init__()
        if hidden_dim < 4 or hidden_dim % 4:
            raise ValueError(f"hidden_dim = {hidden_dim!r} is not allowed; expected a multiple of 4 (D/2 sine features per axis, in sin/cos pairs)")
        if nheads < 1 or hidden_dim % nheads:
            raise ValueError(f"nheads = {nheads!r} is not allowed; expected an int >= 1 that divides hidden_dim = {hidden_dim}")
        if enc_layers < 0:
            raise ValueError(f"enc_layers = {enc_layers!r} is not allowed; expected an int >= 0")
        if dec_layers < 1:
            raise ValueError(f"dec_layers = {dec_layers!r} is not allowed; expected an int >= 1")
        if dim_feedforward < 1:
            raise ValueError(f"dim_feedforward = {dim_feedforward!r} is not allowed; expected an int >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout!r} is not allowed; expected 0 <= dropout < 1")
        if not keep_input_proj and hidden_dim != in_channels:
            raise ValueError(
                f"keep_input_proj = false needs hidden_dim = the backbone's channels ({in_channels}); got hidden_dim = {hidden_dim}"
            )
        self.hidden_dim = hidden_dim
        self.transformer = Transformer(
            hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout, pre_norm,
            keep_first_self_attn_dec, keep_other_self_attn_dec,
        )
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if keep_input_proj else nn.Identity()
        self.query_embed = nn.Embedding(num_classes, hidden_dim)
        self.fc = GroupWiseLinear(num_classes, hidden_dim)
        self._pos_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def position_embedding(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """P for an h x w map, flattened row-major: [h*w, D] (cached per size, device, dtype)."""
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            pos = sine_position_embedding(h, w, self.hidden_dim)
            self._pos_cache[key] = pos.flatten(1).t().to(device=device, dtype=dtype).contiguous()
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.input_proj(x)  # [B, D, h, w]
        h, w = src.shape[2:]
        tokens = src.flatten(2).transpose(1, 2)  # [B, N, D]
        pos = self.position_embedding(h, w, tokens.device, tokens.dtype)  # [N, D]
        out = self.transformer(tokens, pos, self.query_embed.weight.to(tokens.dtype))  # [B, C, D]
        return self.fc(out)  # [B, C]

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        defaults = {n: spec.default for n, spec in hparam_specs(cls).items()}
        value = {**defaults, **hparams}
        text = f"D={value['hidden_dim']}, {value['enc_layers']}+{value['dec_layers']} layers"
        shown = ("hidden_dim", "enc_layers", "dec_layers")
        others = [f"{n}={v}" for n, v in hparams.items() if n not in shown and v != defaults[n]]
        return ", ".join([text, *others])
