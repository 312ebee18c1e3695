"""Vision Transformers for small images (Dosovitskiy et al. 2021, the pre-norm ViT of DeiT).

Non-overlapping patch_size x patch_size patches, embedded by a Conv2d with kernel = stride =
patch_size (a Linear on each flattened patch, as one op); a learned class token and position
embeddings; `depth` pre-norm blocks x + attn(LN(x)), x + mlp(LN(x)); a final LayerNorm and a
Linear head on the class token. Attention has separate q, k, v and output (proj) Linear layers,
so each is a layer of its own to prune (blocks.0.attn.q, ..., blocks.0.mlp.fc1, fc2).

`model.prune` picks the layers whose weights are prunable; the model declares them through
`prunable_modules()`, which masks.prunable_weights honours. Its structured units (attention heads,
MLP hidden channels: granularity=width|heads|mlp) it declares through `units()`; a block may lose
heads (head_dim stays width/heads of the config) and channels, and still runs.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..config.options import ViTConfig
from . import register


class Attention(nn.Module):
    """Multi-head attention; q, k, v give heads·head_dim features, so removing head h is removing
    its head_dim rows of q, k, v and the same columns of proj."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.head_dim, self.dropout = width // heads, dropout
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    @property
    def heads(self) -> int:
        """Read from q's size: a compacted block has fewer heads than the config."""
        return self.q.out_features // self.head_dim

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads·head_dim) -> (batch, heads, tokens, head_dim)"""
        b, n, _ = x.shape
        return x.view(b, n, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(out.transpose(1, 2).flatten(2)))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)
        self.fc2, self.drop2 = nn.Linear(hidden, width), nn.Dropout(dropout)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads, dropout)
        self.norm2, self.mlp = nn.LayerNorm(width), MLP(width, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Units(NamedTuple):
    """One kind of structured unit of one block: unit j owns features [j·span, (j+1)·span) of the
    `rows` layers' outputs (weight rows and bias) and of the `columns` layers' inputs."""

    kind: str  # heads | mlp
    owner: str  # the module whose mask names the units (q, fc1)
    count: int
    span: int  # features per unit: head_dim, or 1 for an MLP channel
    rows: Tuple[str, ...]
    columns: Tuple[str, ...]


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig, input_shape: Tuple[int, ...], num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        p, d = cfg.patch_size, cfg.width
        tokens = (height // p) * (width // p) + 1  # the patches and the class token
        self.patch_embed = nn.Conv2d(channels, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # as ViT/DeiT
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        hidden = round(d * cfg.mlp_ratio)  # >= 1: ViTConfig checks it
        self.blocks = nn.Sequential(*(Block(d, cfg.heads, hidden, cfg.dropout) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        self.prune_kinds = tuple(cfg.prune)  # model.prune

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, patches, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.drop(x)))
        return self.head(x[:, 0])

    def layers_of_kind(self) -> Dict[str, List[str]]:
        """Module names by the kinds model.prune chooses from."""
        blocks = range(len(self.blocks))
        return {"patch": ["patch_embed"],
                "attention": [f"blocks.{i}.attn.{n}" for i in blocks for n in ("q", "k", "v", "proj")],
                "mlp": [f"blocks.{i}.mlp.{n}" for i in blocks for n in ("fc1", "fc2")],
                "head": ["head"]}

    def units(self) -> List[Units]:
        """Every block's attention heads and MLP hidden channels, as they are now."""
        out = []
        for i, block in enumerate(self.blocks):
            attn, fc1 = f"blocks.{i}.attn", f"blocks.{i}.mlp.fc1"
            out.append(Units("heads", f"{attn}.q", block.attn.heads, block.attn.head_dim,
                             (f"{attn}.q", f"{attn}.k", f"{attn}.v"), (f"{attn}.proj",)))
            out.append(Units("mlp", fc1, block.mlp.fc1.out_features, 1, (fc1,), (f"blocks.{i}.mlp.fc2",)))
        return out

    def prunable_modules(self) -> List[str]:
        """The layers whose weights masks may prune (masks.prunable_weights asks for them)."""
        kinds = self.layers_of_kind()
        return [name for kind in self.prune_kinds for name in kinds[kind]]

    def no_weight_decay(self) -> Sequence[str]:
        """Parameters AdamW leaves undecayed besides biases and norms (train.make_optimizer)."""
        return ("cls_token", "pos_embed")


def build_vit(cfg: ViTConfig, input_shape, num_classes) -> ViT:
    if len(input_shape) != 3:
        raise ConfigError(f"model={cfg.name} needs image inputs [C, H, W], the dataset gives {list(input_shape)}")
    _, height, width = input_shape
    p = cfg.patch_size
    if height % p or width % p:
        raise ConfigError(f"model.patch_size={p} must divide the dataset's {height}x{width} images "
                          f"(model={cfg.name} cuts them into non-overlapping patches)")
    return ViT(cfg, input_shape, num_classes)


register("vit_tiny")(build_vit)
register("vit_small")(build_vit)
