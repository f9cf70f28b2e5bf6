"""A small decoder-only Transformer (GPT) and the run presets of ``train_lm.py``.

Pre-LayerNorm blocks, causal self-attention through ``F.scaled_dot_product_attention``, a 4x GELU
MLP, learned token and position embeddings, no biases in the linear layers. The output head is
*untied* from the token embedding: tying makes one matrix carry two gradients of different roles
(a sparse row update from the input side, a dense one from the softmax), which muddies the
per-matrix statistics a Shampoo/SOAP preconditioner keeps; untied, the head is its own d x vocab
matrix with its own eigenbasis. At a character vocabulary it costs a few thousand parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    ctx: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")


@dataclass(frozen=True)
class Preset:
    """A model size with the training budget and learning rates that go with it."""

    d_model: int
    n_layers: int
    n_heads: int
    ctx: int
    batch_size: int
    steps: int
    eval_every: int
    eval_batches: int
    # One tuned learning rate per optimizer, so the default run needs no grid.
    lr: dict[str, float] = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        d_model=32,
        n_layers=2,
        n_heads=2,
        ctx=32,
        batch_size=16,
        steps=6,
        eval_every=3,
        eval_batches=2,
        lr={"adamw": 3e-3, "soap": 3e-3, "shampoo": 3e-3},
        description="CI smoke test: a few steps in seconds",
    ),
    "cpu": Preset(
        d_model=128,
        n_layers=4,
        n_heads=4,
        ctx=64,
        batch_size=256,
        steps=150,
        eval_every=15,
        eval_batches=4,
        # From grids at 150 steps, seed 0 (final val loss): adamw 1e-3 2.495, 1.5e-3 2.473, 3e-3 2.399,
        # 6e-3 2.437, 1.2e-2 2.802, 2.4e-2 2.963; soap 3e-3 2.077, 6e-3 1.982, 1.2e-2 2.130;
        # shampoo 3e-3 1.961, 6e-3 1.903, 1.2e-2 2.443.
        lr={"adamw": 3e-3, "soap": 6e-3, "shampoo": 6e-3},
        description="default: the three-optimizer comparison in <= 10 min on 2 CPU cores",
    ),
    "cpu4x": Preset(
        d_model=256,
        n_layers=4,
        n_heads=8,
        ctx=64,
        batch_size=256,
        steps=150,
        eval_every=15,
        eval_batches=4,
        # The cpu preset's data and budget with twice the width (3.9x its parameters, the same head size).
        # Learning rates carried over from the cpu preset's grids, not tuned at this width.
        lr={"adamw": 3e-3, "soap": 6e-3, "shampoo": 6e-3},
        description="does the gain hold as the model grows: 4x the cpu preset's parameters, same tokens",
    ),
    "gpu": Preset(
        d_model=384,
        n_layers=6,
        n_heads=6,
        ctx=256,
        batch_size=256,
        steps=400,
        eval_every=20,
        eval_batches=8,
        # Not tuned yet (no GPU run so far): a starting point for --lr-grid.
        lr={"adamw": 2e-3, "soap": 3e-3, "shampoo": 3e-3},
        description="--device cuda: 10.7M parameters, 65k tokens per step, 6 epochs",
    ),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model, bias=False)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.ctx, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_out = nn.LayerNorm(config.d_model, bias=False)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaling of the residual-branch outputs keeps the residual stream's variance
        # independent of depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, vocab]``, or the mean cross-entropy when ``targets`` is given."""
        t = idx.shape[1]
        if t > self.config.ctx:
            raise ValueError(f"sequence length {t} exceeds the context {self.config.ctx}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_out(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on the matrices (linear weights and embeddings), none on the LayerNorm gains."""
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        vectors = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"params": matrices, "weight_decay": weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matrix weight (forward + backward) plus attention scores."""
        c = self.config
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and "emb" not in n)
        attention = 2 * 2 * c.n_layers * c.ctx * c.d_model  # QK^T and AV, full (not causal-halved)
        return 6 * matmul + 3 * attention
