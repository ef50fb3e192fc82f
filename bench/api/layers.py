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
