"""Small transformers: a GPT-style language model (``transformer_lm``) and a vision transformer (``vit``).

Both are built from the same hand-written pre-norm block (Radford et al. 2019's GPT-2 layout):
``x + attention(LayerNorm(x))`` then ``x + MLP(LayerNorm(x))``, the attention one ``nn.Linear``
for queries, keys and values and one for the output, computed by
``F.scaled_dot_product_attention`` (causal for the language model). Every parameter lives in an
``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding`` or ``nn.Conv2d``, each called with a batch-first
input: layers whose per-sample gradient norms the ``exact`` estimator computes from its hooks, so
diversity is measured exactly, with no extra pass. For the same reason positions are an
``nn.Embedding`` looked up per sample (not a bare parameter), and the ViT pools its tokens by
their mean instead of prepending a class-token parameter.

Initialisation as in GPT-2: normal weights of standard deviation 0.02, zero biases, and the
residual projections scaled by ``1 / sqrt(2 * depth)`` so that the residual stream's variance
does not grow with depth.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dbx.models.linear import num_outputs

__all__ = ["transformer_lm", "vit", "Block", "TransformerLM", "VisionTransformer"]


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, T, width)``; ``causal`` masks the future."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool, bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.out = nn.Linear(width, width, bias=bias)
        self.heads, self.dropout, self.causal = heads, dropout, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 2-layer GELU MLP, each around a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, causal: bool, bias: bool) -> None:
        super().__init__()
        hidden = int(mlp_ratio * width)
        self.norm1 = nn.LayerNorm(width, bias=bias)
        self.attn = SelfAttention(width, heads, dropout, causal, bias)
        self.norm2 = nn.LayerNorm(width, bias=bias)
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.proj = nn.Linear(hidden, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.proj(F.gelu(self.fc(self.norm2(x)))))


def _init_gpt(model: nn.Module, depth: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            residual = name.endswith(("attn.out", ".proj"))
            nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * depth) if residual else 0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class TransformerLM(nn.Module):
    """Token ids ``(B, T)`` -> next-token logits ``(B, T, vocab)``."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 dropout: float, tie_head: bool, bias: bool) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio, dropout, True, bias) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, bias=bias)
        self.head = nn.Linear(width, vocab, bias=False)
        _init_gpt(self, depth)
        if tie_head:  # one Parameter for the input embedding and the output layer (Press and Wolf 2017)
            self.head.weight = self.tokens.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        batch, length = idx.shape
        if length > self.positions.num_embeddings:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's context "
                             f"({self.positions.num_embeddings}); raise model.params.context")
        where = torch.arange(length, device=idx.device).expand(batch, length)
        x = self.drop(self.tokens(idx) + self.positions(where))
        return self.head(self.norm(self.blocks(x)))


class VisionTransformer(nn.Module):
    """Images ``(B, C, H, W)`` -> logits ``(B, classes)``: patches, blocks, mean-pooled tokens."""

    def __init__(self, channels: int, size: tuple[int, int], patch: int, classes: int, width: int, depth: int,
                 heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.patches = nn.Conv2d(channels, width, patch, stride=patch)
        count = (size[0] // patch) * (size[1] // patch)
        self.positions = nn.Embedding(count, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio, dropout, False, True) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        _init_gpt(self, depth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2)  # (B, patches, width)
        batch, count, _ = x.shape
        where = torch.arange(count, device=images.device).expand(batch, count)
        x = self.drop(x + self.positions(where))
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def _check_width(width: int, heads: int, depth: int) -> None:
    if width < 1 or heads < 1 or depth < 1:
        raise ValueError(f"width, heads and depth must be positive, got {width}, {heads}, {depth}")
    if width % heads:
        raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")


def transformer_lm(
    *,
    num_classes: int | None,
    input_shape: tuple[int, ...],
    width: int = 128,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
    context: int | None = None,
    tie_head: bool = False,
    bias: bool = True,
) -> nn.Module:
    """A GPT-style decoder for sequence data (``text_file``, ``python_stdlib``): token and position
    embeddings, ``depth`` causal pre-norm blocks of ``width`` with ``heads`` heads, a final
    LayerNorm and a linear head over the vocabulary (``num_classes``).

    ``context`` is the longest sequence it takes (default: the data's sequence length).
    ``tie_head`` shares the token embedding with the head (fewer parameters); the ``exact``
    estimator refuses a parameter shared by two modules, so it is off by default. With the
    defaults and 256 byte tokens: about 0.88 M parameters.
    """
    if num_classes is None or len(input_shape) != 1:
        raise ValueError(f"transformer_lm needs sequence data: token ids of shape (T,) with a vocabulary "
                         f"(e.g. data: text_file or python_stdlib), got input_shape {tuple(input_shape)} and "
                         f"num_classes {num_classes}")
    _check_width(width, heads, depth)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    length = int(input_shape[0])
    context = length if context is None else int(context)
    if context < length:
        raise ValueError(f"context ({context}) is shorter than the data's sequences ({length})")
    return TransformerLM(int(num_classes), context, width, depth, heads, mlp_ratio, dropout, tie_head, bias)


def vit(
    *,
    num_classes: int | None,
    input_shape: tuple[int, ...],
    patch: int = 4,
    width: int = 128,
    depth: int = 6,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
) -> nn.Module:
    """A small vision transformer (Dosovitskiy et al. 2021) for CIFAR (32 px) or MNIST (28 px):
    ``patch`` x ``patch`` patches embedded by a strided convolution, learned position
    embeddings, ``depth`` pre-norm blocks, the tokens' mean, a linear head. The image sides must
    be multiples of ``patch`` (32 px: 2, 4, 8; 28 px: 2, 4, 7). With the defaults on 32 px
    CIFAR-10: 64 patches, about 0.8 M parameters.
    """
    if len(input_shape) != 3:
        raise ValueError(f"vit needs image inputs (C, H, W), got input_shape {tuple(input_shape)}")
    channels, height, width_px = (int(v) for v in input_shape)
    if patch < 1 or height % patch or width_px % patch:
        raise ValueError(f"the image sides ({height} x {width_px}) must be multiples of patch ({patch})")
    _check_width(width, heads, depth)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return VisionTransformer(channels, (height, width_px), patch, num_outputs(num_classes), width, depth, heads,
                             mlp_ratio, dropout)
