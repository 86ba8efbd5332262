"""Models of the training CLI: a GPT-style decoder (lm), a small ViT (imagecls) and a pretrained
Hugging Face encoder with a classification head (textcls). Each names, in `int4_filter`, the layers
that int4train converts: every nn.Linear inside the transformer blocks (attention projections, MLP),
never the embeddings, the patch embedding, a pooler, or the final LM head / classifier, which stay in
higher precision as in the paper.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). The four nn.Linear
    layers (qkv, proj, fc, fc_out) are the ones int4train converts; the attention score and value
    products (scaled_dot_product_attention) and the norms stay in higher precision."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc_out = nn.Linear(mlp_ratio * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))


def _init_weights(module: nn.Module) -> None:
    # GPT-2 / ViT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def blocks_filter(module: nn.Module, name: str) -> bool:
    """convert_ filter of GPT and ViT: the nn.Linear layers under `blocks.` (transformer blocks)."""
    return name.startswith("blocks.")


class GPT(nn.Module):
    """A GPT-style causal decoder: token + learned position embeddings, `layers` pre-LN blocks, a final
    LayerNorm and an LM head tied to the token embedding. Input (B, T) token ids, T <= context;
    output (B, T, vocab) logits."""

    def __init__(
        self,
        vocab_size: int,
        context: int,
        layers: int,
        d_model: int,
        heads: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [Block(d_model, heads, dropout=dropout, causal=True) for _ in range(layers)]
        )
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(_init_weights)
        self.head.weight = self.tok.weight
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers).
        for blk in self.blocks:
            for lin in (blk.proj, blk.fc_out):
                nn.init.normal_(lin.weight, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    int4_filter = staticmethod(blocks_filter)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"GPT: sequence length {t} exceeds the context {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class ViT(nn.Module):
    """A small Vision Transformer: a Conv2d patch embedding (patch x patch, stride patch), a class
    token, learned position embeddings, `layers` pre-LN blocks, a final LayerNorm and a linear
    classifier on the class token. Input (B, C, H, W) with H and W multiples of patch."""

    def __init__(
        self,
        image_size: tuple,
        channels: int,
        num_classes: int,
        patch: int,
        layers: int,
        d_model: int,
        heads: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        h, w = image_size
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of --patch {patch}")
        self.patch_embed = nn.Conv2d(channels, d_model, kernel_size=patch, stride=patch)
        n = (h // patch) * (w // patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, d_model))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, heads, dropout=dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.apply(_init_weights)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)

    int4_filter = staticmethod(blocks_filter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x[:, 0]))


class EncoderClassifier(nn.Module):
    """A pretrained Hugging Face encoder (AutoModel) with mean pooling over the attention mask (as
    sentence-transformers pools all-MiniLM-L6-v2), dropout and a linear classifier."""

    def __init__(self, folder: Path, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        from transformers import AutoModel  # imported here: lm and imagecls do not need it

        self.encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
        hidden = self.encoder.config.hidden_size
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        _init_weights(self.head)

    @staticmethod
    def int4_filter(module: nn.Module, name: str) -> bool:
        """The encoder's nn.Linear layers except its pooler: every projection of the transformer
        layers (BERT: query, key, value, attention output, intermediate, output). The classifier
        `head` and the embeddings stay in higher precision."""
        return name.startswith("encoder.") and ".pooler." not in name + "."

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(self.drop(pooled))
