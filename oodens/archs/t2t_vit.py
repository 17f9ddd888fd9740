"""``T2T-ViT-14``: the official Tokens-to-Token ViT-14 (Yuan et al., ICCV 2021) with the
Performer T2T module, for 224x224 inputs.

Tokens-to-token: soft split (unfold 7x7, stride 4, padding 2) -> ``attention1`` (a
one-head Performer on 147-d tokens, 64-d output, 32 positive random features ``w``) ->
re-structure to a 56x56 map -> unfold 3x3/2 -> ``attention2`` (576-d in, 64 out) ->
28x28 -> unfold 3x3/2 -> ``project`` (576 -> 384): 196 tokens. Then a CLS token, the
fixed sinusoidal ``pos_embed`` (a non-trainable parameter, so it is in the state dict),
14 transformer blocks (dim 384, 6 heads, MLP ratio 3, no qkv bias), the final ``norm``
and the head ``head`` on the CLS token; ``forward_features`` is ``norm(x)[:, 0]`` -> 384.

The attention scale is ``head_dim ** -0.5`` (``qk_scale=None``), as the official
``main.py`` builds the model for training and for ``--eval_checkpoint``; the official
``t2t_vit_14(pretrained=True)`` path overrides it with ``384 ** -0.5`` (pass
``qk_scale=384 ** -0.5`` to :class:`T2TViT` to get that variant). In the Performer,
the reference casts to float32 inside ``prm_exp`` (an AMP guard); here the module's own
dtype is kept, which is the same in float32.

RankFeat stages: the token matrices after the second-to-last block (block 13 of 14) and
after the last block. Each is returned as a 4-D map ``(B, D, N, 1)`` (D = 384 channels,
N = 197 tokens, CLS included) so that rank-1 removal acts on the D x N token matrix.
``last_stage(map)`` runs the last block on such a map and returns the same layout;
``logits_from_last_stage(map)`` = ``head(norm(tokens)[:, 0])``. Hence
``logits_from_last_stage(last_stage(second)) == logits_from_last_stage(last) == forward(x)``.

Layers of the multi-layer views: the token matrix after each of the 14 blocks, seen as a D x N map
(pooling averages the N = 197 tokens, CLS included).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodens.archs.registry import register_arch
from oodens.archs.stages import Layer


def sinusoid_encoding(n_position: int, d_hid: int) -> torch.Tensor:
    """(1, n_position, d_hid) table: sin on even, cos on odd dims, angle pos / 10000^(2*(j//2)/d)."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(d_hid)[None, :]
    table = pos / np.power(10000, 2 * (j // 2) / d_hid)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


class TokenPerformer(nn.Module):
    """One-head Performer (positive random features) used inside the T2T module.

    The attention output is added to ``v`` (the input and output widths differ).
    """

    def __init__(self, dim: int, emb: int, kernel_ratio: float = 0.5, dp1: float = 0.1, dp2: float = 0.1):
        super().__init__()
        self.emb = emb
        self.kqv = nn.Linear(dim, 3 * emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(emb, emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb), nn.Dropout(dp2))
        self.m = int(emb * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(self.m, emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w^T x - |x|^2 / 2) / sqrt(m): (B, T, emb) -> (B, T, m)."""
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.t() - xd) / math.sqrt(self.m)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
        denom = (qp @ kp.sum(dim=1).unsqueeze(-1))  # (B, T, 1)
        kptv = v.transpose(1, 2) @ kp  # (B, emb, m)
        y = (qp @ kptv.transpose(1, 2)) / (denom + self.epsilon)  # (B, T, emb)
        return v + self.dp(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Tokens-to-token with Performer layers: 224x224 image -> (B, 196, embed_dim)."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 384, token_dim: int = 64):
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenPerformer(in_chans * 7 * 7, token_dim)
        self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.num_patches = (img_size // 16) ** 2

    @staticmethod
    def _restructure(x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = math.isqrt(n)
        return x.transpose(1, 2).reshape(b, c, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = self.attention2(self.soft_split1(self._restructure(x)).transpose(1, 2))
        x = self.soft_split2(self._restructure(x)).transpose(1, 2)
        return self.project(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 qk_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TViT(nn.Module):
    def __init__(self, num_classes: int, img_size: int = 224, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 14, num_heads: int = 6, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, token_dim: int = 64):
        super().__init__()
        self.feature_dim = embed_dim
        self.tokens_to_token = T2TModule(img_size, in_chans, embed_dim, token_dim)
        n = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_encoding(n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.feature_layers = tuple(Layer(f"blocks.{i}", tokens=True) for i in range(depth))
        # the reference's init: truncated normal (std .02) for the CLS token and Linear weights
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.head

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input tokens of the first block: (B, 197, D)."""
        t = self.tokens_to_token(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]

    @staticmethod
    def _to_map(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).unsqueeze(-1).contiguous()  # (B, N, D) -> (B, D, N, 1)

    @staticmethod
    def _from_map(a: torch.Tensor) -> torch.Tensor:
        return a.squeeze(-1).transpose(1, 2)  # (B, D, N, 1) -> (B, N, D)

    def rankfeat_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        return self._to_map(t), self._to_map(self.blocks[-1](t))

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self._to_map(self.blocks[-1](self._from_map(a)))

    def logits_from_last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self._from_map(a))[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_arch("T2T-ViT-14", folder="T2T-ViT-14")
def t2t_vit_14(num_classes: int) -> nn.Module:
    return T2TViT(num_classes, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
