"""Decoder-only transformer LM (pre-LayerNorm, GELU MLP, learned positions, tied embedding)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of one transformer; `max_len` is the longest context it can read."""

  n_layer: int
  d_model: int
  n_heads: int
  vocab_size: int
  max_len: int
  dtype: str = "float32"  # compute dtype; parameters are always float32

  @property
  def d_head(self) -> int:
    return self.d_model // self.n_heads


# Kaplan et al. 2020 name models by non-embedding parameters N ≈ 12·n_layer·d_model².
# (n_layer, d_model, n_heads); heads of width 64 from 128 up, as in GPT-2.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 32, 2),  # tests
    "25k": (2, 32, 2),
    "98k": (2, 64, 2),  # CPU demo scans
    "393k": (2, 128, 2),
    "3m": (4, 256, 4),
    "25m": (8, 512, 8),
    "85m": (12, 768, 12),
    "302m": (24, 1024, 16),
    "708m": (36, 1280, 20),
}
LADDER = ("393k", "3m", "25m", "85m", "302m", "708m")


def non_embedding_params(cfg: ModelConfig) -> int:
  """Exact non-embedding parameter count N of the model below (Kaplan's N)."""
  d, n = cfg.d_model, cfg.n_layer
  attn = 4 * d * d + 4 * d  # qkv and output projections with biases
  mlp = 8 * d * d + 5 * d  # d -> 4d -> d with biases
  norms = 4 * d  # two LayerNorms (scale, bias) per block
  return n * (attn + mlp + norms) + 2 * d  # + final LayerNorm


def embedding_params(cfg: ModelConfig) -> int:
  """Token plus position embedding parameters."""
  return (cfg.vocab_size + cfg.max_len) * cfg.d_model


class Embed(nn.Module):
  """Token and learned position embeddings; `attend` reuses the token table as output layer."""

  cfg: ModelConfig

  def setup(self):
    init = nn.initializers.normal(stddev=0.02)
    self.token = self.param("token", init, (self.cfg.vocab_size, self.cfg.d_model))
    self.position = self.param("position", init, (self.cfg.max_len, self.cfg.d_model))

  def __call__(self, ids_BxT: jax.Array) -> jax.Array:
    t = ids_BxT.shape[1]
    x_BxTxD = self.token[ids_BxT] + self.position[:t][None]
    return x_BxTxD.astype(self.cfg.dtype)

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    # float32 accumulation even in bfloat16: the loss is compared with targets to 0.01 nats.
    return jnp.dot(x_BxTxD, self.token.T.astype(x_BxTxD.dtype),
                   preferred_element_type=jnp.float32)


def causal_attention(q_BxTxNxH: jax.Array, k_BxTxNxH: jax.Array,
                     v_BxTxNxH: jax.Array) -> jax.Array:
  """softmax(q·kᵀ/√H + causal mask)·v, as jax.nn.dot_product_attention(is_causal=True).

  Written out because XLA's CPU backend runs it, forward and backward, faster than the
  library call (3m shape, 8 × 256 tokens, 4 heads × 64, one core: 48 ms against 82 ms; the
  whole train step ≈ 11% faster). Heads-major matmuls; the scale is folded into q; the
  softmax runs in float32 even when the compute dtype is bfloat16. Forward-over-reverse
  (the B_noise Hessian-vector products) differentiates it like any JAX code.
  """
  dtype = q_BxTxNxH.dtype
  q_BxNxTxH = (q_BxTxNxH * q_BxTxNxH.shape[-1] ** -0.5).transpose(0, 2, 1, 3)
  k_BxNxTxH = k_BxTxNxH.transpose(0, 2, 1, 3)
  v_BxNxTxH = v_BxTxNxH.transpose(0, 2, 1, 3)
  s_BxNxTxT = jnp.matmul(q_BxNxTxH, k_BxNxTxH.swapaxes(-1, -2),
                         preferred_element_type=jnp.float32)
  t = s_BxNxTxT.shape[-1]
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  # -inf is safe: the diagonal is never masked, so no row is all -inf.
  p_BxNxTxT = jax.nn.softmax(jnp.where(causal_TxT, s_BxNxTxT, -jnp.inf), axis=-1)
  y_BxNxTxH = jnp.matmul(p_BxNxTxT.astype(dtype), v_BxNxTxH)
  return y_BxNxTxH.transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Causal multi-head self-attention."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    qkv = nn.Dense(3 * cfg.d_model, dtype=cfg.dtype, name="qkv",
                   kernel_init=nn.initializers.normal(0.02))(x_BxTxD)
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * cfg.n_heads, cfg.d_head), 3, axis=2)
    y_BxTxNxH = causal_attention(q, k, v)
    # Output projection scaled down with depth (GPT-2) so the residual stream starts O(1).
    proj_init = nn.initializers.normal(0.02 / (2 * cfg.n_layer) ** 0.5)
    return nn.Dense(cfg.d_model, dtype=cfg.dtype, name="proj", kernel_init=proj_init)(
        y_BxTxNxH.reshape(b, t, cfg.d_model))


class Mlp(nn.Module):
  """GELU MLP of width 4·d_model."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    h = nn.Dense(4 * cfg.d_model, dtype=cfg.dtype, name="fc",
                 kernel_init=nn.initializers.normal(0.02))(x_BxTxD)
    proj_init = nn.initializers.normal(0.02 / (2 * cfg.n_layer) ** 0.5)
    return nn.Dense(cfg.d_model, dtype=cfg.dtype, name="proj", kernel_init=proj_init)(
        nn.gelu(h))


class Block(nn.Module):
  """Pre-LayerNorm transformer block."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(dtype=self.cfg.dtype, name=name)
    x_BxTxD = x_BxTxD + Attention(self.cfg, name="attn")(norm("ln1")(x_BxTxD))
    return x_BxTxD + Mlp(self.cfg, name="mlp")(norm("ln2")(x_BxTxD))


class Transformer(nn.Module):
  """Decoder-only LM returning float32 logits [B, T, vocab]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, ids_BxT: jax.Array) -> jax.Array:
    embed = Embed(self.cfg, name="embed")
    x_BxTxD = embed(ids_BxT)
    for i in range(self.cfg.n_layer):
      x_BxTxD = Block(self.cfg, name=f"block_{i}")(x_BxTxD)
    x_BxTxD = nn.LayerNorm(dtype=self.cfg.dtype, name="ln_f")(x_BxTxD)
    return embed.attend(x_BxTxD).astype(jnp.float32)


def logits_fn(model: Transformer, params, batch_BxT1: jax.Array) -> jax.Array:
  """Logits for the inputs of a packed batch int32[B, T+1]."""
  return model.apply({"params": params}, batch_BxT1[:, :-1])


def cross_entropy(logits_BxTxV: jax.Array, batch_BxT1: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats/token) against the targets of a packed batch."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch_BxT1[:, 1:]).mean()


def loss_fn(model: Transformer, params, batch_BxT1: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats/token) of a packed batch int32[B, T+1]."""
  return cross_entropy(logits_fn(model, params, batch_BxT1), batch_BxT1)
