"""Building blocks that several head plugins share (as ``timm.layers`` is for timm's models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names and initialisation.

    query [B, L, D], key [B, S, D], value [B, S, D] -> [B, L, D]. Parameters ``in_proj_weight``
    [3D, D], ``in_proj_bias`` [3D], ``out_proj.weight`` [D, D], ``out_proj.bias`` [D], so a
    released checkpoint's attention weights load by name. Dropout (train mode) acts on the attention
    weights, as in ``nn.MultiheadAttention``. Written with matmuls, so that the FLOP counter sees
    every multiply-add (the fused kernel hides them).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by the number of heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        d, nh = self.dim, self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.split(d)
        b_q, b_k, b_v = self.in_proj_bias.split(d)
        b, l, s = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, w_q, b_q).view(b, l, nh, d // nh).transpose(1, 2)  # [B, H, L, D/H]
        k = F.linear(key, w_k, b_k).view(b, s, nh, d // nh).transpose(1, 2)  # [B, H, S, D/H]
        v = F.linear(value, w_v, b_v).view(b, s, nh, d // nh).transpose(1, 2)  # [B, H, S, D/H]
        attn = torch.softmax((q * (d // nh) ** -0.5) @ k.transpose(-2, -1), dim=-1)  # [B, H, L, S]
        attn = F.dropout(attn, self.dropout, self.training)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, l, d))


class FeedForwardLayer(nn.Module):
    """Base of a transformer layer with the position-wise feed-forward block
    ``FFN(u) = W2 · dropout(relu(W1 · u + b1)) + b2`` ([..., D] -> [..., D], hidden width F), held
    under the names released checkpoints use (``linear1`` [F, D], ``dropout``, ``linear2`` [D, F]),
    so the query heads' released weights load by name.

    A subclass builds its attention first and then calls :meth:`add_feed_forward`: parameters are
    created (and randomly initialised) in the releases' order, so a seeded model is the same.
    """

    def add_feed_forward(self, dim: int, ff_dim: int, dropout: float) -> None:
        self.linear1 = nn.Linear(dim, ff_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ff_dim, dim)

    def feed_forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [..., D] -> [..., D]."""
        return self.linear2(self.dropout(F.relu(self.linear1(u))))


class TransformerEncoderLayer(FeedForwardLayer):
    """DETR's encoder layer (Query2Label's encoder; C-Tran's with no position embedding):

    post-norm: ``x = norm1(x + dropout1(MHA(x + p, x + p, x)))``; ``x = norm2(x + dropout2(FFN(x)))``;
    pre-norm: ``x = x + dropout1(MHA(u + p, u + p, u))`` with ``u = norm1(x)``;
    ``x = x + dropout2(FFN(norm2(x)))``. x [B, N, D], p [N, D] or None (no embedding) -> [B, N, D].
    Parameters ``self_attn.*``, ``linear1.*``, ``linear2.*``, ``norm1.*``, ``norm2.*``.
    """

    def __init__(self, dim: int, num_heads: int, ff_dim: int, dropout: float, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = MultiheadAttention(dim, num_heads, dropout)
        self.add_feed_forward(dim, ff_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D], pos [N, D] or None -> [B, N, D]."""
        # queries and keys each add the embedding on their own: one shared sum gives the same
        # forward but accumulates the input's gradient in another order (different last bits)
        def with_pos(u: torch.Tensor) -> torch.Tensor:
            return u if pos is None else u + pos

        if self.pre_norm:
            u = self.norm1(x)
            x = x + self.dropout1(self.self_attn(with_pos(u), with_pos(u), u))
            return x + self.dropout2(self.feed_forward(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self.self_attn(with_pos(x), with_pos(x), x)))
        return self.norm2(x + self.dropout2(self.feed_forward(x)))
