"""ML-Decoder: a transformer-decoder classification head with group decoding (SPEC §2; Ridnik et
al., "ML-Decoder: Scalable and Versatile Classification Head", WACV 2023; Alibaba-MIIL/ML_Decoder).

Shapes: x [B, d, h, w] (any h, w >= 1), N = h*w positions, C classes, E = ``embed_dim``,
K = number of queries (groups), g = ceil(C / K) logits per query, H = ``num_heads``.

    t   = ReLU(x_flat W_eᵀ + b_e)                   tokens                           [B, N, E]
    q₀  = Q + Dropout(Q)                            K fixed queries Q [K, E] (not    [K, E]
                                                    trained, saved), ADDED TO THEMSELVES
                                                    before the first norm (the release's
                                                    ``tgt = tgt + dropout1(tgt)``): 2Q in eval
    q₁  = LN₁(q₀)                                                                    [B, K, E]
    u   = LN₂(q₁ + Dropout(MHA(q₁, t, t)))          cross-attention only, no self-   [B, K, E]
                                                    attention between the queries
    o   = LN₃(u + Dropout(W₂ Dropout(ReLU(W₁ u + b₁)) + b₂))    feed-forward E -> F -> E
    z_k = o_k P_k                                   group decoding: query k has its  [B, K, g]
                                                    own matrix P_k [E, g]
    logits = flatten(z)[:, :C] + b                  the first C of the K·g outputs,  [B, C]
                                                    plus a per-class bias b [C]

``MHA`` is standard multi-head attention (softmax(q_h k_hᵀ / sqrt(E/H)) v_h per head, dropout on
the attention weights, output projection), the parameters stored as ``nn.MultiheadAttention``
stores them (``in_proj_weight [3E, E]``, ``in_proj_bias [3E]``, ``out_proj.{weight,bias}``); it is
written out with matmuls here so that the FLOP counter sees every multiply-add.

K (``num_groups``): -1 = min(100, C) as released (one query per class up to 100 classes); a value
above C is reduced to C, as released. g = ceil(C / K); the release's ``int(C / K + 0.999)`` is the
same number whenever K <= 1000.

State dict: exactly the release's head keys and shapes (``decoder.embed_standart.{weight [E, d],
bias [E]}``, ``decoder.query_embed.weight [K, E]``, ``decoder.layers.0.{norm1, multihead_attn,
linear1, linear2, norm2, norm3}.*``, ``decoder.duplicate_pooling [K, E, g]``,
``decoder.duplicate_pooling_bias [C]``), so a released checkpoint's head (``head.*`` for TResNet,
``fc.*`` for ResNet; strip that prefix) loads with ``load_state_dict(strict=True)``. The release's
``nn.TransformerDecoder`` wrapper cannot run on torch >= 2.1 (it passes ``tgt_is_causal`` to a
layer that does not accept it); this module computes the same function without it.

Defaults are sized for a CPU benchmark: E = 128, F = ``ff_dim`` = 512, 8 heads, dropout 0.1, K =
min(100, C) (on tiny_cnn's 8 x 8 x 128 maps: 11 MFLOPs per image, 0.4x the backbone). The
release's width is E = 768, F = 2048 (8 heads, dropout 0.1): set ``embed_dim = 768, ff_dim =
2048`` to run it (the full grids' sweep includes it). Trained parameters at d = 2048, C = 80:
0.47 M (defaults) vs 7.15 M (the release's width). At E = 768 one plain-SGD step at lr 0.05
on a 16-image toy batch overshoots (the logits move with E through the LayerNorm'd query vectors);
the release trains it with Adam at lr 1e-4.

Initialisation as released: ``nn.Linear`` defaults, queries N(0, 1) (``nn.Embedding``), attention
``in_proj_weight`` Xavier-uniform with zero biases, ``duplicate_pooling`` Xavier-normal, bias 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import FeedForwardLayer, Head, HeadContext, MultiheadAttention, hparam_specs, register_head

DEFAULT_MAX_GROUPS = 100  # the release's embed_len_decoder when num_of_groups < 0


def num_queries(num_groups: int, num_classes: int) -> int:
    """K: ``num_groups`` (-1 = min(100, C)), reduced to C when larger (as released)."""
    k = DEFAULT_MAX_GROUPS if num_groups == -1 else num_groups
    return min(k, num_classes)


class DecoderLayer(FeedForwardLayer):
    """The release's ``TransformerDecoderLayerOptimal``: q + Dropout(q), LN, cross-attention, LN,
    feed-forward, LN. [B, K, E] queries, [B, N, E] tokens -> [B, K, E]."""

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.multihead_attn = MultiheadAttention(embed_dim, num_heads, dropout)
        self.add_feed_forward(embed_dim, ff_dim, dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm1(queries + self.dropout1(queries))  # 2Q in eval mode (the release's quirk)
        q = self.norm2(q + self.dropout2(self.multihead_attn(q, tokens, tokens)))
        return self.norm3(q + self.dropout3(self.feed_forward(q)))


class Decoder(nn.Module):
    """Holds the head's parameters under the release's names (``decoder.*``)."""

    def __init__(self, in_channels: int, num_classes: int, k: int, embed_dim: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.duplicate_factor = math.ceil(num_classes / k)  # g
        self.layers = nn.ModuleList([DecoderLayer(embed_dim, num_heads, ff_dim, dropout)])
        self.embed_standart = nn.Linear(in_channels, embed_dim)  # sic: the release's spelling
        self.query_embed = nn.Embedding(k, embed_dim)  # N(0, 1), fixed: saved but never trained
        self.query_embed.requires_grad_(False)
        self.duplicate_pooling = nn.Parameter(torch.empty(k, embed_dim, self.duplicate_factor))
        self.duplicate_pooling_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_normal_(self.duplicate_pooling)


@register_head("ml_decoder")
class MLDecoderHead(Head):
    """ML-Decoder: K fixed queries cross-attend to the projected positions; group decoding."""

    sweep = (
        {"num_groups": [1, 5, 10, -1]},  # K = 1 (one query for all classes) ... K = min(100, C) (full decoding)
        {"embed_dim": 768, "ff_dim": 2048},  # the release's width (full decoding)
    )

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        context: HeadContext | None = None,
        *,
        num_groups: int = -1,
        embed_dim: int = 128,
        num_heads: int = 8,
        ff_dim: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_groups != -1 and num_groups < 1:
            raise ValueError(f"num_groups = {num_groups!r} is not allowed; expected -1 (= min(100, C)) or an int >= 1")
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("ff_dim", ff_dim)):
            if value < 1:
                raise ValueError(f"{name} = {value!r} is not allowed; expected an int >= 1")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim = {embed_dim} must be divisible by num_heads = {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout!r} is not allowed; expected 0 <= dropout < 1")
        self.num_classes = num_classes
        self.k = num_queries(num_groups, num_classes)
        self.decoder = Decoder(in_channels, num_classes, self.k, embed_dim, num_heads, ff_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        tokens = F.relu(dec.embed_standart(x.flatten(2).transpose(1, 2)))  # [B, N, E]
        queries = dec.query_embed.weight.unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, K, E]
        for layer in dec.layers:
            queries = layer(queries, tokens)  # [B, K, E]
        groups = torch.einsum("bke,keg->bkg", queries, dec.duplicate_pooling)  # [B, K, g]
        return groups.flatten(1)[:, : self.num_classes] + dec.duplicate_pooling_bias  # [B, C]

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        k = hparams.get("num_groups", -1)
        defaults = {n: spec.default for n, spec in hparam_specs(cls).items()}
        text = ("K=min(100,C)" if k == -1 else f"K={k}") + f", E={hparams.get('embed_dim', defaults['embed_dim'])}"
        others = [f"{n}={hparams[n]}" for n in ("num_heads", "ff_dim", "dropout") if n in hparams and hparams[n] != defaults[n]]
        return ", ".join([text, *others])
