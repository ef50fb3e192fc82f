"""C-Tran: one transformer over the feature tokens and one learned token per label, each label token
carrying its state (SPEC §2; Lanchantin et al., "General Multi-label Image Classification with
Transformers", CVPR 2021; QData/C-Tran ``models/CTran.py`` and ``models/transformer_layers.py`` with
``use_lmt=True``, ``pos_emb=False``, its defaults, without the backbone).

Shapes: x [B, d, h, w] (any h, w >= 1), N = h*w positions, C classes; the token width is d itself
(no projection, as released; ``hidden_dim`` below is an opt-in exception); H = ``num_heads``, L =
``num_layers``. ``label_state`` [B, C]: -1 unknown, 0 known negative, 1 known positive; None = all
unknown (:mod:`bench.api.label_states`).

    t      = x flattened, one token per position                                 [B, N, d]
    u_c    = l_c + s[state_c + 1]          l = label_lt [C, d]; s = known_label_lt [3, d]:
                                           row 0 unknown, 1 known negative, 2 known positive  [B, C, d]
    e      = LN([t ; u])                   one LayerNorm over all N + C tokens          [B, N+C, d]
    L x (post-norm encoder layer; dropout p = ``dropout``):
        e = LN₁(e + Dropout(MHA(e, e, e)))
        e = LN₂(e + Dropout(W₂ Dropout(ReLU(W₁ e + b₁)) + b₂))      feed-forward d -> d -> d
    y_c    = w_c · e_{N+c} + b_c           the diagonal of output_linear (Linear_{d->C})  [B, C]
           applied to the C label tokens (the release computes all C x C and keeps the diagonal)

``MHA`` is standard multi-head attention over all N + C tokens (no mask, H heads, dropout on the
attention weights) under ``nn.MultiheadAttention``'s parameter names (``bench.api.MultiheadAttention``).

State row 0 (unknown) is the embedding's ``padding_idx``: it gets no gradient. It is NOT zero: the
release's ``weights_init`` draws every row of ``known_label_lt`` (the padding row included) after
the embedding zeroed it, so the unknown state adds a fixed random vector; a loaded state dict
supplies the release's. Evaluation (None) adds that row to every label token, as the release does
with its all-unknown mask.

State dict = the release's minus ``backbone.*``: ``label_lt.weight [C, d]``, ``known_label_lt.weight
[3, d]``, ``self_attn_layers.i.transformer_layer.{self_attn.{in_proj_weight [3d, d], in_proj_bias
[3d], out_proj.weight [d, d], out_proj.bias [d]}, linear1.{weight [d, d], bias}, linear2.{weight
[d, d], bias}, norm1.*, norm2.*}``, ``output_linear.{weight [C, d], bias [C]}``, ``LayerNorm.{weight,
bias}``. A checkpoint saved by the release (``{"state_dict": model.state_dict()}``, ``module.``
prefixed under DataParallel) loads with ``strict=True`` once ``module.`` is stripped and
``backbone.*`` dropped.

Initialisation as released (``weights_init``): every ``nn.Linear`` and ``nn.Embedding`` weight
(and Linear bias) uniform in ±1/sqrt(fan-in) (for an embedding: its width), LayerNorms 1 and 0; the
attention's ``in_proj_weight`` Xavier-uniform with zero ``in_proj_bias`` (``nn.MultiheadAttention``'s
own, which ``weights_init`` does not touch).

d must be divisible by ``num_heads`` (the release: 2048 / 4): any other width is a ``ValueError``
at construction (a usage error before training, naming both remedies), never a silent projection.
``hidden_dim`` (default None: the release) is NOT in the release: an int D first maps the map to D
channels with a 1x1 convolution ``input_proj`` (d -> D, with bias; PyTorch's default
initialisation), after which every equation above holds with d = D (the state dict gains
``input_proj.{weight [D, d, 1, 1], bias [D]}``). It makes the head affordable on wide CPU maps (the
release's width on EfficientNet-Lite0's 1280 channels costs 1.8 GFLOPs per image) and accepts any d;
D must be divisible by ``num_heads``. Cost: about 6 d² + 2 (N + C) d multiply-adds per token and
layer: 75.9 M parameters and 43.5 GFLOPs per image at d = 2048, 14 x 14, C = 80, 3 layers
(docs/heads.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bench.api import Head, HeadContext, TransformerEncoderLayer, hparam_specs, label_state_indices, register_head

NUM_STATES = 3  # unknown (padding row 0), known negative, known positive


class SelfAttnLayer(nn.Module):
    """The release's wrapper (its name is part of the state-dict keys: ``transformer_layer``)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        # the release's post-norm nn.TransformerEncoderLayer with feed-forward width d (ReLU), no position embedding
        self.transformer_layer = TransformerEncoderLayer(dim, num_heads, dim, dropout)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.transformer_layer(e)


def release_init(module: nn.Module) -> None:
    """The release's ``weights_init``, for ``module.apply``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        bound = 1.0 / math.sqrt(module.weight.shape[1])
        with torch.no_grad():
            module.weight.uniform_(-bound, bound)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.uniform_(-bound, bound)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_head("c_tran")
class CTranHead(Head):
    """C-Tran: a transformer encoder over the feature tokens and C state-carrying label tokens."""

    sweep = ({"num_layers": [1, 3], "num_heads": [1, 4]},)  # 3 layers x 4 heads: the release
    reads_label_states = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        context: HeadContext | None = None,
        *,
        num_heads: int = 4,
        num_layers: int = 3,
        dropout: float = 0.1,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_heads", num_heads), ("num_layers", num_layers), ("hidden_dim", 1 if hidden_dim is None else hidden_dim)):
            if value < 1:
                raise ValueError(f"{name} = {value!r} is not allowed; expected an int >= 1")
        if hidden_dim is None and in_channels % num_heads:
            raise ValueError(
                f"C-Tran's token width is the backbone's channel count ({in_channels}), which must be divisible by "
                f"num_heads = {num_heads}; choose num_heads among the divisors of {in_channels} (e.g. 1), or project "
                f"the map to hidden_dim channels (not in the release)"
            )
        if hidden_dim is not None and hidden_dim % num_heads:
            raise ValueError(f"hidden_dim = {hidden_dim} must be divisible by num_heads = {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout!r} is not allowed; expected 0 <= dropout < 1")
        self.num_classes = num_classes
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, 1) if hidden_dim is not None else None
        width = in_channels if hidden_dim is None else hidden_dim  # the token width
        self.label_lt = nn.Embedding(num_classes, width)
        self.known_label_lt = nn.Embedding(NUM_STATES, width, padding_idx=0)
        self.self_attn_layers = nn.ModuleList([SelfAttnLayer(width, num_heads, dropout) for _ in range(num_layers)])
        self.output_linear = nn.Linear(width, num_classes)
        self.LayerNorm = nn.LayerNorm(width)
        for part in (self.label_lt, self.known_label_lt, self.LayerNorm, self.self_attn_layers, self.output_linear):
            part.apply(release_init)

    def forward(self, x: torch.Tensor, label_state: torch.Tensor | None = None) -> torch.Tensor:
        b, c = x.shape[0], self.num_classes
        if self.input_proj is not None:
            x = self.input_proj(x)  # [B, D, h, w] (hidden_dim; not in the release)
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, d]
        states = self.known_label_lt(label_state_indices(label_state, b, c, x.device))  # [B, C, d]
        labels = (self.label_lt.weight.unsqueeze(0) + states).to(tokens.dtype)  # [B, C, d]
        e = self.LayerNorm(torch.cat((tokens, labels), dim=1))  # [B, N + C, d]
        for layer in self.self_attn_layers:
            e = layer(e)
        out = e[:, -c:, :]  # the label tokens [B, C, d]
        return torch.einsum("bcd,cd->bc", out, self.output_linear.weight.to(out.dtype)) + self.output_linear.bias  # [B, C]

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        defaults = {n: spec.default for n, spec in hparam_specs(cls).items()}
        value = {**defaults, **hparams}
        text = f"L={value['num_layers']}, H={value['num_heads']}"
        if value["hidden_dim"] is not None:
            text += f", D={value['hidden_dim']} (projected)"
        return text if value["dropout"] == defaults["dropout"] else f"{text}, dropout={value['dropout']}"
