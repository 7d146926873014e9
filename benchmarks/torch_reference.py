"""A PyTorch reference of bscan's model and train step, for experiments.benchmark (not bscan).

nanoGPT-style and shaped like bscan.model.Transformer: pre-LayerNorm (eps 1e-6, as flax),
GELU (tanh) MLP of width 4d, learned positions, tied token embedding as output layer, causal
F.scaled_dot_product_attention, init N(0, 0.02) with the output projections scaled by
1/√(2·n_layer); AdamW(β=(0.9, 0.95), eps 1e-8, no weight decay, like the scan configs) after
clipping the global gradient norm to 1.0; K microbatches of gradient accumulation per step.
One thread (torch.set_num_threads(1)), eager mode. torch is installed only by `make benchmark`.
"""

import math
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
  """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, d_model: int, n_heads: int):
    super().__init__()
    self.n_heads = n_heads
    self.ln1 = nn.LayerNorm(d_model, eps=1e-6)
    self.qkv = nn.Linear(d_model, 3 * d_model)
    self.attn_proj = nn.Linear(d_model, d_model)
    self.ln2 = nn.LayerNorm(d_model, eps=1e-6)
    self.fc = nn.Linear(d_model, 4 * d_model)
    self.mlp_proj = nn.Linear(4 * d_model, d_model)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.mlp_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Transformer(nn.Module):
  """Decoder-only LM returning float32 logits [B, T, vocab]."""

  def __init__(self, n_layer: int, d_model: int, n_heads: int, vocab_size: int, max_len: int):
    super().__init__()
    self.token = nn.Embedding(vocab_size, d_model)
    self.position = nn.Embedding(max_len, d_model)
    self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(d_model, eps=1e-6)
    for name, p in self.named_parameters():
      if p.dim() >= 2:
        std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
        nn.init.normal_(p, std=std)
      elif "ln" not in name:
        nn.init.zeros_(p)

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1], device=ids.device)
    x = self.token(ids) + self.position(pos)[None]
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x) @ self.token.weight.T


def non_embedding_params(model: Transformer) -> int:
  """Parameters outside the token and position tables (Kaplan's N)."""
  embed = model.token.weight.numel() + model.position.weight.numel()
  return sum(p.numel() for p in model.parameters()) - embed


def make_step(n_layer: int, d_model: int, n_heads: int, vocab_size: int, seq_len: int,
              batch: int, microbatch: int, seed: int = 0) -> Callable[[], float]:
  """Returns step() -> loss: one AdamW step on a fixed random batch int64[batch, T+1]."""
  torch.set_num_threads(1)
  torch.manual_seed(seed)
  model = Transformer(n_layer, d_model, n_heads, vocab_size, seq_len)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.0)
  rng = np.random.default_rng(seed + 1)
  tokens = torch.from_numpy(rng.integers(0, vocab_size, (batch, seq_len + 1), np.int64))
  mbs = tokens.view(batch // microbatch, microbatch, seq_len + 1)

  def step() -> float:
    total = 0.0
    for mb in mbs:
      logits = model(mb[:, :-1])
      loss = F.cross_entropy(logits.reshape(-1, vocab_size), mb[:, 1:].reshape(-1))
      (loss / len(mbs)).backward()
      total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total / len(mbs)

  step.model = model  # for parameter-count checks
  return step
