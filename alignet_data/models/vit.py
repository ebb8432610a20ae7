"""Vision Transformer in big_vision's parameter layout.

Module and parameter names follow big_vision `models/vit.py` exactly (`embedding`, `pos_embedding`, `cls`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `MAPHead_0`, `head`), so a big_vision `.npz`
checkpoint (e.g. SigLIP So400m/14's image tower) loads by name with no conversion.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

POOL_TYPES = ("gap", "tok", "map", "0")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> jnp.ndarray:
  """Fixed 2-D sin-cos position embedding (MoCo v3), shape (1, h * w, width)."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width divisible by 4, got width={width}")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
  y = np.einsum("m,d->md", y.ravel(), omega)
  x = np.einsum("m,d->md", x.ravel(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, jnp.float32)[None]


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense_0 -> gelu -> Dense_1."""
  mlp_dim: int | None = None  # Defaults to 4x input dim.
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    inits = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * d, **inits)(x)
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, **inits)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(), deterministic=deterministic)(y, y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    y = nn.LayerNorm()(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout)(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return x + y


class Encoder(nn.Module):
  """Stack of `depth` blocks named `encoderblock_{i}`, then `encoder_norm`."""
  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    for i in range(self.depth):
      x = Encoder1DBlock(
          name=f"encoderblock_{i}", mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
      )(x, deterministic)
    return nn.LayerNorm(name="encoder_norm")(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: one learned probe attends over all tokens (SigLIP's pooling)."""
  mlp_dim: int | None = None
  num_heads: int = 12

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
    probe = jnp.tile(probe, [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform())(
        probe, x)
    y = nn.LayerNorm()(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim)(y)
    return x[:, 0]


class ViT(nn.Module):
  """ViT; `__call__` returns `(logits, out)` with `out["pre_logits"]` the pooled representation.

  `logits` is `out["pre_logits"]` when `num_classes` is falsy (no `head`).
  """
  num_classes: int | None = None
  patch_size: Sequence[int] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  posemb: str = "learn"  # or "sincos2d"
  rep_size: int | bool = False
  dropout: float = 0.0
  pool_type: str = "gap"  # "gap" | "tok" | "map" | "0"
  head_zeroinit: bool = True

  @nn.compact
  def __call__(self, image: jnp.ndarray, *, train: bool = False) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    out = {}
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown pool type: '{self.pool_type}'; expected one of {POOL_TYPES}")
    x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                name="embedding")(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    # Position embedding is added BEFORE the cls token is prepended (big_vision convention).
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c), x.dtype)
    elif self.posemb == "sincos2d":
      pe = posemb_sincos_2d(h, w, c).astype(x.dtype)
    else:
      raise ValueError(f"Unknown posemb type: '{self.posemb}'; expected 'learn' or 'sincos2d'")
    x = x + pe
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
      x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                name="Transformer")(x, deterministic=not train)
    out["encoded"] = x
    if self.pool_type == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim)(x)
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    else:  # "tok" and "0": the first token.
      x = x[:, 0]
    out["head_input"] = x
    if self.rep_size:
      rep_size = self.width if self.rep_size is True else self.rep_size
      x = nn.tanh(nn.Dense(rep_size, name="pre_logits")(x))
    out["pre_logits"] = x
    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      x = out["logits"] = nn.Dense(self.num_classes, name="head", **kw)(x)
    return x, out
