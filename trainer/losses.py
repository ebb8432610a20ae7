"""Triplet losses for fine-tuning a student on AligNet triplets (paper, Methods: "Objective function").

The target is the teacher's 3-way distribution softmax(similarities) with NO temperature: the stored
similarities already carry the teacher's temperature tau' = 1 (the released trainer does the same). The
prediction is softmax(student dot products / tau) with tau = 100, because raw ViT dot products are large and
a temperature of 1 would give near one-hot predictions. Pairs are in the fixed order [s01, s02, s12].

All functions return one value per triplet (B,); average them yourself (so a masked or weighted mean stays
possible). They are pure JAX and jit/grad-safe.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from alignet_data import triplet_math

DEFAULT_TAU = 100.0

def kl_from_similarities(student_sims: jax.Array, target_sims: jax.Array, tau: float = DEFAULT_TAU) -> jax.Array:
  """KL(softmax(target_sims) || softmax(student_sims / tau)) per triplet, in nats."""
  log_p = jax.nn.log_softmax(target_sims.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(student_sims.astype(jnp.float32) / tau, axis=-1)
  return triplet_math.kl_divergence_jax(log_p, log_q)


def js_from_similarities(student_sims: jax.Array, target_sims: jax.Array, tau: float = DEFAULT_TAU) -> jax.Array:
  """Jensen-Shannon divergence between the same two distributions as `kl_from_similarities` (<= log 2)."""
  log_p = jax.nn.log_softmax(target_sims.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(student_sims.astype(jnp.float32) / tau, axis=-1)
  log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)  # Stays finite where p or q underflows to 0.
  return 0.5 * triplet_math.kl_divergence_jax(log_p, log_m) + 0.5 * triplet_math.kl_divergence_jax(log_q, log_m)


def contrastive_from_similarities(student_sims: jax.Array, target_sims: jax.Array,
                                  tau: float = DEFAULT_TAU) -> jax.Array:
  """Hard loss: NLL of the teacher's most similar pair under softmax(student_sims / tau)."""
  best = jnp.argmax(target_sims, axis=-1)
  log_q = jax.nn.log_softmax(student_sims.astype(jnp.float32) / tau, axis=-1)
  return -jnp.take_along_axis(log_q, best[:, None], axis=-1)[:, 0]


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "kl": kl_from_similarities,
    "js": js_from_similarities,
    "contrastive": contrastive_from_similarities,
}


def get_loss(name: str) -> Callable[..., jax.Array]:
  """The per-triplet loss on similarities by name: 'kl' (the paper), 'js' (the released config), 'contrastive'."""
  if name not in LOSSES:
    raise ValueError(f"Unknown triplet loss {name!r}; choose one of {sorted(LOSSES)}.")
  return LOSSES[name]


def kl_triplet_loss(z: jax.Array, target_sims: jax.Array, tau: float = DEFAULT_TAU) -> jax.Array:
  """The AligNet KL loss on (B, 3, d) student representations; (B,) values."""
  return kl_from_similarities(triplet_math.pair_similarities_jax(z), target_sims, tau)


def js_triplet_loss(z: jax.Array, target_sims: jax.Array, tau: float = DEFAULT_TAU) -> jax.Array:
  """The JS variant (the released SigLIP config uses it); (B,) values."""
  return js_from_similarities(triplet_math.pair_similarities_jax(z), target_sims, tau)


def triplet_agreement(student_sims: jax.Array, target_sims: jax.Array) -> jax.Array:
  """1.0 where the student's odd one out equals the teacher's, else 0.0 (`triplet_math.odd_one_out_correct_jax`:
  an undefined answer, a tie or a non-finite similarity, is never a hit; a teacher tie has no answer to match)."""
  return triplet_math.odd_one_out_correct_jax(student_sims, triplet_math.odd_one_out_jax(target_sims))
