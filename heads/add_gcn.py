"""ADD-GCN: semantic attention and a dynamic graph over per-class vectors (SPEC §2; Ye et al.,
"Attention-Driven Dynamic Graph Convolutional Network for Multi-Label Image Recognition", ECCV 2020;
Yejin0111/ADD-GCN ``models/add_gcn.py``, class ``ADD_GCN`` without its backbone).

Shapes: x [B, d, h, w] (any h, w >= 1), N = h*w positions, C classes, H = ``hidden_dim`` (the
release: 1024). σ is the logistic sigmoid, ρ = LeakyReLU with slope 0.2. Every "Conv1d" is a
1-wide convolution over the C class nodes, i.e. a matrix applied to each node's vector.

    M   = W_fc x                                   Conv1x1_{d->C}, no bias               [B, C, N]
    s1  = max_n M                                  the release's ``topk(1).mean``        [B, C]
  semantic attention (SAM):
    V   = (W_t x + b_t) σ(M)ᵀ                      Conv1x1_{d->H}, then [H, N] @ [N, C]  [B, H, C]
  D-GCN on the C nodes:
    S   = ρ(W_s ρ(A_s Vᵀ)ᵀ + b_s)                  A_s [C, C] (no bias), W_s [H, H]      [B, H, C]
    V'  = V + S
    g   = ρ(BN(W_g mean_c V' + b_g))               the global vector, broadcast to C     [B, H, 1]
    A_d = σ(W_co [g; V'] + b_co)                   W_co [C, 2H]: a per-image graph       [B, C, C]
    Z   = ρ(W_d ρ(V' A_d) + b_d)                   W_d [H, H]                            [B, H, C]
  read-out:
    O   = W_l (V + Z) + b_l                        Conv1d_{H->C} on every node           [B, C, C]
    s2_c = Σ_j O_cj · mask_cj                      mask = I: the diagonal O_cc           [B, C]
    logits = (s1 + s2) / 2                                                               [B, C]

The logits are the release's ``(out1 + out2) / 2``, the tensor its trainer feeds to the loss and
to the evaluation. Note that the read-out adds V, not V' (the release's ``z = v + z``).

State dict = the release's head: ``fc.weight [C, d, 1, 1]``, ``conv_transform.{weight [H, d, 1,
1], bias [H]}``, ``gcn.static_adj.0.weight [C, C, 1]``, ``gcn.static_weight.0.{weight [H, H, 1],
bias}``, ``gcn.conv_global.{weight [H, H, 1], bias}``, ``gcn.bn_global.*`` (BatchNorm1d with its
running statistics), ``gcn.conv_create_co_mat.{weight [C, 2H, 1], bias [C]}``,
``gcn.dynamic_weight.{weight [H, H, 1], bias}``, ``mask_mat [C, C]``, ``last_linear.{weight [C, H,
1], bias [C]}``. A released checkpoint (``{"state_dict": model.state_dict()}``) loads with
``strict=True`` once its backbone keys ``features.*`` are dropped. ``mask_mat`` is the identity and
never trained: the release keeps it as a parameter but detaches it in the forward pass (so it gets
no gradient and no weight decay); here it is a buffer (saved, not a parameter), and the forward
pass uses whatever a loaded state holds, as the release does.

Differences from the release: any ``in_channels`` (the release hard-codes 2048 in
``conv_transform``) and any ``hidden_dim``; the release's trainer drops the last incomplete
batch, the harness keeps it, so a ONE-image training batch (which BatchNorm cannot normalise over)
is normalised with the running statistics, which it then leaves unchanged. Initialisation as
released: PyTorch's defaults for every convolution, BatchNorm weight 1 and bias 0, mask = I.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import Head, HeadContext, hparam_specs, register_head

SLOPE = 0.2  # the release's LeakyReLU(0.2)


class DynamicGraphConvolution(nn.Module):
    """The D-GCN: a static graph over the C nodes, then a graph built per image. [B, H, C] -> [B, H, C]."""

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.static_adj = nn.Sequential(nn.Conv1d(num_classes, num_classes, 1, bias=False), nn.LeakyReLU(SLOPE))
        self.static_weight = nn.Sequential(nn.Conv1d(hidden, hidden, 1), nn.LeakyReLU(SLOPE))
        self.conv_global = nn.Conv1d(hidden, hidden, 1)
        self.bn_global = nn.BatchNorm1d(hidden)
        self.conv_create_co_mat = nn.Conv1d(2 * hidden, num_classes, 1)
        self.dynamic_weight = nn.Conv1d(hidden, hidden, 1)

    def global_vector(self, v: torch.Tensor) -> torch.Tensor:
        """g = ρ(BN(W_g mean_c v + b_g)): [B, H, C] -> [B, H, 1]."""
        g = self.conv_global(v.mean(dim=2, keepdim=True))
        bn = self.bn_global
        if self.training and g.shape[0] == 1:
            # one image: no batch statistics to take (the release drops such a batch); use the running ones
            g = F.batch_norm(g, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            g = bn(g)
        return F.leaky_relu(g, SLOPE)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        s = self.static_weight(self.static_adj(v.transpose(1, 2)).transpose(1, 2))  # S [B, H, C]
        v = v + s  # V'
        g = self.global_vector(v).expand_as(v)  # [B, H, C]
        adj = torch.sigmoid(self.conv_create_co_mat(torch.cat((g, v), dim=1)))  # A_d [B, C, C]
        return F.leaky_relu(self.dynamic_weight(F.leaky_relu(v @ adj, SLOPE)), SLOPE)  # Z [B, H, C]


@register_head("add_gcn")
class ADDGCNHead(Head):
    """ADD-GCN: class-wise max of a 1x1 classifier, averaged with a dynamic-graph read-out."""

    sweep = ({"hidden_dim": [256, 1024]},)  # a quarter of the release's width, and the release's

    def __init__(self, in_channels: int, num_classes: int, context: HeadContext | None = None, *, hidden_dim: int = 1024) -> None:
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim = {hidden_dim!r} is not allowed; expected an int >= 1")
        self.fc = nn.Conv2d(in_channels, num_classes, 1, bias=False)
        self.conv_transform = nn.Conv2d(in_channels, hidden_dim, 1)
        self.gcn = DynamicGraphConvolution(hidden_dim, num_classes)
        self.register_buffer("mask_mat", torch.eye(num_classes))
        self.last_linear = nn.Conv1d(hidden_dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.fc(x).flatten(2)  # M [B, C, N]
        s1 = scores.max(dim=2).values  # [B, C]; the gradient goes to one position, as the release's topk(1)
        v = self.conv_transform(x).flatten(2) @ torch.sigmoid(scores).transpose(1, 2)  # V [B, H, C]
        z = v + self.gcn(v)  # [B, H, C]
        s2 = (self.last_linear(z) * self.mask_mat).sum(dim=2)  # [B, C]
        return (s1 + s2) / 2

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        default = hparam_specs(cls)["hidden_dim"].default
        return f"H={hparams.get('hidden_dim', default)}"
