"""Int4MultiheadAttention: torch.nn.MultiheadAttention with its projections as Int4Linear layers.

nn.MultiheadAttention computes its projections inside F.multi_head_attention_forward from raw
weights, so no layer swap reaches them; convert_ replaces the whole module by this one, which runs
the same attention (F.multi_head_attention_forward's masks, scaling, dropout and returned weights)
around four Int4Linear layers, and unconvert_ gives the nn.MultiheadAttention back.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Recipe
from .nn import Int4Linear, _Weights


def _part(t: Optional[torch.Tensor], i: int, rows: int) -> Optional[nn.Parameter]:
    if t is None:
        return None
    return nn.Parameter(t.detach()[i * rows:(i + 1) * rows].clone(), requires_grad=t.requires_grad)


def _float_mask(mask: Optional[torch.Tensor], name: str, dtype: torch.dtype):
    """A boolean mask (True: not attended) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise TypeError(
            f"Int4MultiheadAttention: {name} must be bool or floating, got {mask.dtype}"
        )
    return mask.to(dtype)


class Int4MultiheadAttention(nn.Module):
    """Multi-head attention as torch.nn.MultiheadAttention computes it, with the query, key, value
    and output projections as Int4Linear layers (q_proj, k_proj, v_proj, out_proj).

    Int4MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False,
    recipe="hq_lss", layer_id=0, ...) builds one initialised as nn.MultiheadAttention(embed_dim,
    num_heads, ...) would be (its layers take ids layer_id .. layer_id + 3); from_mha (convert_
    calls it) takes over an nn.MultiheadAttention whose key and value have the query's size and
    which has no bias_k / bias_v and no add_zero_attn. The packed in_proj_weight (and
    in_proj_bias) becomes three new Parameters, one per projection (so build the optimizer after
    converting); out_proj keeps its Parameters. forward takes nn.MultiheadAttention.forward's
    arguments and returns what it returns. to_mha() packs the projections back into an
    nn.MultiheadAttention (unconvert_).
    """

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        num_heads: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        recipe="hq_lss",
        layer_id: int = 0,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim is None:  # from_mha fills it in
            return
        mha = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias,
                                    batch_first=batch_first, device=device, dtype=dtype)
        self._take(mha, Recipe.of(recipe), layer_id, process_group)

    @classmethod
    def supports(cls, mha: nn.MultiheadAttention) -> bool:
        return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn

    @classmethod
    def from_mha(
        cls,
        mha: nn.MultiheadAttention,
        recipe: Recipe,
        first_layer_id: int,
        process_group=None,
    ) -> "Int4MultiheadAttention":
        if not cls.supports(mha):
            raise ValueError(
                "Int4MultiheadAttention.from_mha: expected key and value of the query's size, no "
                "bias_k / bias_v and no add_zero_attn"
            )
        out = cls()
        out._take(mha, recipe, first_layer_id, process_group)
        return out

    def _take(self, mha: nn.MultiheadAttention, recipe: Recipe, first_layer_id: int,
              process_group) -> None:
        e = mha.embed_dim
        self.embed_dim, self.kdim, self.vdim = e, e, e
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self._qkv_same_embed_dim = True
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            part = _Weights(_part(mha.in_proj_weight, i, e), _part(mha.in_proj_bias, i, e))
            layer = Int4Linear.from_linear(part, recipe, first_layer_id + i, process_group)
            setattr(self, name, layer)
        self.out_proj = Int4Linear.from_linear(
            mha.out_proj, recipe, first_layer_id + 3, process_group
        )
        self.train(mha.training)

    # The packed projection, read by PyTorch's checks (nn.TransformerEncoderLayer's fast path).
    @property
    def in_proj_weight(self) -> torch.Tensor:
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    def to_mha(self) -> nn.MultiheadAttention:
        w = self.q_proj.weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout,
            bias=self.q_proj.bias is not None, batch_first=self.batch_first,
            device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            mha.in_proj_weight.copy_(self.in_proj_weight)
            mha.in_proj_weight.requires_grad_(w.requires_grad)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(self.in_proj_bias)
        mha.out_proj.weight, mha.out_proj.bias = self.out_proj.weight, self.out_proj.bias
        mha.train(self.training)
        return mha

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, e = query.shape
        src = key.shape[1]
        if e != self.embed_dim or key.shape != value.shape or key.shape[0] != n:
            raise ValueError(
                f"Int4MultiheadAttention: expected query (.., {self.embed_dim}) and key, value of "
                f"one shape with the query's batch, got {tuple(query.shape)}, {tuple(key.shape)}, "
                f"{tuple(value.shape)}"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)"
            )
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)
        dtype = q.dtype
        mask = _float_mask(attn_mask, "attn_mask", dtype)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.view(1, 1, tgt, src)
            elif mask.dim() == 3:
                mask = mask.view(n, h, tgt, src)
            else:
                raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
        pad = _float_mask(key_padding_mask, "key_padding_mask", dtype)
        if pad is not None:
            pad = pad.view(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
        else:
            causal = is_causal and key_padding_mask is None
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if causal else mask, dropout_p=dropout_p, is_causal=causal
            )
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, e))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, " \
            f"batch_first={self.batch_first}"
