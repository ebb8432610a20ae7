"""VICE: variational interpretable concept embeddings of human odd-one-out choices, in JAX + optax.

VICE (Muttenthaler et al., ICLR 2022; paper Methods, "Modelling human uncertainties") learns, for every object
and dimension, a Gaussian variational posterior q(X) = N(loc, scale^2). The model of a choice draws one
embedding sample X = loc + scale * eps, makes it non-negative (ReLU), and takes the softmax over the three pair
dot products [s01, s02, s12]. Training minimises the negative ELBO per triplet: the NLL of the human pair (see
`triplet_math` for the convention) plus the KL term log q(X) - log p(X), estimated from the same sample, summed over
all objects and dimensions and scaled by 1 / N (N = training triplets), under a spike-and-slab Gaussian prior
p = pi N(0, spike^2) + (1 - pi) N(0, slab^2). Dimensions are pruned by a Benjamini-Hochberg test of how many
objects are reliably positive; training stops when that count is stable for `ws` epochs after `burnin`. Short
schedules (our data sizes, see `pipelines.human_stage.PROFILES`) anneal the step over the first window so the count
settles (`lr_final`) and, once pruned, train the kept dimensions a little longer (`refine`); `fit_restarts` runs
several seeds and keeps the best validation NLL, as VICE's authors select among seeds.

The human soft labels p* are the posterior predictive: the MEAN OF PROBABILITIES over R samples (not the softmax
of averaged logits), with sample r drawn from a key derived from (seed, r) over the whole embedding matrix, so a
triplet's p* does not depend on which other triplets are scored with it and is reproducible for a seed.

Reference implementation: github.com/LukasMut/VICE (PyTorch). Its defaults are kept: d = 100, Adam 1e-3, batch
128, pi 0.5, spike 0.25, slab 1.0, alpha 0.05, k = 5, means initialised Kaiming-normal (fan-out) and log-scales at
-1 / std(loc). Its normal pdf multiplies by sqrt(2 pi) instead of dividing; the constant cancels in
log q - log p, so the correct density is used here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

from alignet_data import triplet_math

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
PRUNE_MODES = ("converged", "always", "never")
MODELS = ("vice", "spose")


@dataclasses.dataclass(frozen=True)
class ViceConfig:
  dims: int = 100          # Initial dimensionality d.
  epochs: int = 2000       # Maximum number of epochs.
  batch_size: int = 128
  lr: float = 1e-3         # Adam learning rate.
  pi: float = 0.5          # Prior weight of the spike.
  spike: float = 0.25      # Prior std of the spike.
  slab: float = 1.0        # Prior std of the slab.
  alpha: float = 0.05      # Benjamini-Hochberg false discovery rate for pruning.
  k: int = 5               # A dimension is kept when more than k objects are reliably positive in it.
  burnin: int = 500        # No convergence check before this epoch.
  ws: int = 200            # Converged when the pruned dimensionality is unchanged for ws epochs (after burn-in).
  # Learning-rate schedule: lr until burn-in, then a geometric decay to lr * lr_final over the next ws epochs, and
  # constant after. Annealing over the first window lets the noisy dimension count settle, so the convergence rule
  # can fire (with a constant large step it keeps flickering by one dimension); 1.0 keeps lr constant (VICE's own).
  lr_final: float = 1.0
  # After the convergence rule fires and the failing dimensions are pruned: this many more epochs training only
  # the kept ones. VICE converges after ~10^6-10^7 steps, by which time the spike has absorbed
  # the dimensions it does not need; a short schedule stops earlier, when the dimensions that fail the test still
  # carry some signal (THINGS files, 13 of 100 kept: test accuracy 0.587 -> 0.565 on pruning), and retraining the
  # kept ones lets them take it over (-> 0.584), with lr annealed again to lr * lr_final. 0: VICE's own.
  refine: int = 0
  # Keep only the BH-selected dimensions in the final parameters: "converged" (only when the convergence rule
  # stopped training), "always" (VICE's behaviour) or "never". Before convergence the test can reject nearly
  # every dimension while they still carry signal (THINGS, batch 128, 40 epochs: 3 of 100 pass; p* accuracy on
  # the 50k test set drops from 0.564 with all dimensions to 0.380 with those 3; batch 1024, 90 epochs: 13 pass,
  # 0.585 -> 0.567), hence the default.
  prune: str = "converged"
  eval_every: int = 1      # With validation triplets: score them every this many epochs.
  val_samples: int = 10    # Posterior samples for the validation score (VICE's default).
  keep_best: bool = False  # With validation triplets: return the parameters of the epoch with the best val NLL.
  patience: int = 0        # With validation triplets: stop after this many scorings without a better val NLL (0: off).
  seed: int = 0
  # "vice", or "spose": the plain SPoSE model (Hebart et al. 2020) trained by the same loop: one point embedding
  # per object, kept non-negative by projection after every step, NLL + lmbda / n_objects * L1 (no prior, no
  # sampling; scale is 0). Its defaults as in SPoSE: weights ~ N(0.1, 0.01), lmbda 0.008.
  model: str = "vice"
  lmbda: float = 0.008


@dataclasses.dataclass
class ViceResult:
  """Final (pruned, sorted) posterior parameters and the training history."""
  loc: np.ndarray          # (m, d') means.
  scale: np.ndarray        # (m, d') standard deviations.
  kept: np.ndarray         # (d',) indices of the kept dimensions in the d-dimensional model, in stored order.
  epochs: int              # Epochs run.
  converged: bool          # Whether the convergence rule stopped training.
  history: list[dict[str, float]]
  best_epoch: int | None = None  # With keep_best: the epoch whose parameters were returned.
  dims_significant: int = 0      # Dimensions passing the BH test at the end (kept when pruning applies).
  seed: int = 0
  val_nll: float | None = None       # With validation triplets: scores of the returned (pruned) parameters,
  val_accuracy: float | None = None  # from cfg.val_samples posterior samples.
  seconds: float = 0.0

  def summary(self) -> dict[str, Any]:
    """One restart's figures for a report."""
    return {"seed": self.seed, "epochs": self.epochs, "converged": self.converged, "dims_kept": int(self.loc.shape[1]),
            "dims_significant": self.dims_significant, "val_nll": self.val_nll, "val_accuracy": self.val_accuracy,
            "best_epoch": self.best_epoch, "seconds": round(self.seconds, 1)}


# ----------------------------------------------------------------------------------------------------------------
# Densities.


def log_normal(x: jax.Array, loc: jax.Array | float, scale: jax.Array | float) -> jax.Array:
  """Elementwise log N(x; loc, scale^2)."""
  return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - _LOG_SQRT_2PI


def log_spike_and_slab(x: jax.Array, pi: float = 0.5, spike: float = 0.25, slab: float = 1.0) -> jax.Array:
  """Elementwise log of the prior pi N(x; 0, spike^2) + (1 - pi) N(x; 0, slab^2), computed stably."""
  return jnp.logaddexp(math.log(pi) + log_normal(x, 0.0, spike), math.log1p(-pi) + log_normal(x, 0.0, slab))


# ----------------------------------------------------------------------------------------------------------------
# The model.


def init_params(n_objects: int, dims: int, seed: int, model: str = "vice") -> dict[str, jax.Array]:
  """VICE: loc ~ Kaiming normal (std sqrt(2 / d), as torch's fan_out mode), log_scale = -1 / std(loc).
  SPoSE: loc ~ N(0.1, 0.01^2) (SPoSE's init: every object starts weakly positive in every dimension)."""
  noise = jax.random.normal(jax.random.key(seed), (n_objects, dims), jnp.float32)
  if model == "spose":
    return {"loc": 0.1 + 0.01 * noise}
  loc = noise * math.sqrt(2.0 / dims)
  return {"loc": loc, "log_scale": jnp.full_like(loc, -1.0 / jnp.std(loc))}


def loss_fn(params: dict[str, jax.Array], key: jax.Array, triplets: jax.Array, weights: jax.Array, n_train: int,
            pi: float, spike: float, slab: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative ELBO per triplet on one batch (padded rows carry weight 0)."""
  loc, scale = params["loc"], jnp.exp(params["log_scale"])
  eps = jax.random.normal(key, loc.shape, loc.dtype)
  x = loc + scale * eps
  logits = triplet_math.triplet_similarities_jax(jax.nn.relu(x), triplets)
  denom = jnp.maximum(weights.sum(), 1.0)
  nll = jnp.sum(weights * triplet_math.human_pair_nll_jax(logits)) / denom
  # log q(x) with x = loc + scale * eps is -eps^2 / 2 - log scale - log sqrt(2 pi): the same value and gradients
  # as log_normal(x, loc, scale), without recomputing (x - loc) / scale.
  log_q = -0.5 * eps ** 2 - params["log_scale"] - _LOG_SQRT_2PI
  complexity = jnp.sum(log_q - log_spike_and_slab(x, pi, spike, slab)) / n_train
  acc = jnp.sum(weights * triplet_math.odd_one_out_correct_jax(logits)) / denom
  return nll + complexity, {"nll": nll, "complexity": complexity, "accuracy": acc}


def spose_loss_fn(params: dict[str, jax.Array], triplets: jax.Array, weights: jax.Array, n_objects: int,
                  lmbda: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SPoSE's objective on one batch: NLL of the human pair + lmbda / n_objects * ||W||_1 (W kept >= 0)."""
  w = params["loc"]
  logits = triplet_math.triplet_similarities_jax(w, triplets)
  denom = jnp.maximum(weights.sum(), 1.0)
  nll = jnp.sum(weights * triplet_math.human_pair_nll_jax(logits)) / denom
  complexity = lmbda / n_objects * jnp.sum(jnp.abs(w))
  acc = jnp.sum(weights * triplet_math.odd_one_out_correct_jax(logits)) / denom
  return nll + complexity, {"nll": nll, "complexity": complexity, "accuracy": acc}


@functools.partial(jax.jit, static_argnames=("optimizer", "n_train", "pi", "spike", "slab", "model", "lmbda"))
def _train_epoch(params, opt_state, key, batches, weights, *, optimizer, n_train, pi, spike, slab, model="vice",
                 lmbda=0.0):
  """One pass over (n_batches, B, 3) index batches with lax.scan; returns new state and per-batch metrics."""
  if model == "spose":
    n_objects = params["loc"].shape[0]
    grad_fn = jax.value_and_grad(lambda p, k, b, w: spose_loss_fn(p, b, w, n_objects, lmbda), has_aux=True)
  else:
    grad_fn = jax.value_and_grad(lambda p, k, b, w: loss_fn(p, k, b, w, n_train, pi, spike, slab), has_aux=True)

  def step(carry, inputs):
    params, opt_state = carry
    i, batch, w = inputs
    (loss, aux), grads = grad_fn(params, jax.random.fold_in(key, i), batch, w)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if model == "spose":  # SPoSE's non-negativity: project onto W >= 0 after every step.
      params = {"loc": jax.nn.relu(params["loc"])}
    return (params, opt_state), {"loss": loss, **aux}

  idx = jnp.arange(batches.shape[0])
  (params, opt_state), metrics = jax.lax.scan(step, (params, opt_state), (idx, batches, weights))
  return params, opt_state, metrics


def _epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A shuffled epoch as (n_batches, B) row indices and weights (the last batch padded with weight 0)."""
  n_batches = -(-n // batch_size)
  perm = np.zeros(n_batches * batch_size, np.int64)
  perm[:n] = rng.permutation(n)
  w = np.zeros(n_batches * batch_size, np.float32)
  w[:n] = 1.0
  return perm.reshape(n_batches, batch_size), w.reshape(n_batches, batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Pruning and convergence.


def bh_reject(pvals: np.ndarray, alpha: float = 0.05) -> np.ndarray:
  """Benjamini-Hochberg rejections along the last axis: reject the p-values ranked <= the largest rank i with
  p_(i) <= alpha * i / m (statsmodels' `multipletests(method="fdr_bh")[0]`)."""
  p = np.asarray(pvals, np.float64)
  m = p.shape[-1]
  order = np.argsort(p, axis=-1, kind="stable")
  sorted_p = np.take_along_axis(p, order, axis=-1)
  below = sorted_p <= alpha * np.arange(1, m + 1) / m
  # Number of rejections = 1 + the last rank that passes (0 when none does).
  n_reject = np.where(below.any(-1), m - np.argmax(below[..., ::-1], axis=-1), 0)
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(m), axis=-1)
  return ranks < n_reject[..., None]


def dimension_importance(loc: np.ndarray, scale: np.ndarray, alpha: float = 0.05) -> np.ndarray:
  """Per dimension: how many objects are significantly positive (H0: x_od <= 0, p = Phi(0; loc, scale)),
  Benjamini-Hochberg corrected over objects. A point estimate (scale 0, SPoSE) counts its positive entries."""
  loc, scale = np.asarray(loc, np.float64), np.asarray(scale, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    pvals = np.where(scale > 0, special.ndtr(-loc / np.where(scale > 0, scale, 1.0)), (loc <= 0).astype(np.float64))
  return bh_reject(pvals.T, alpha).sum(-1)


def kept_dimensions(loc: np.ndarray, scale: np.ndarray, alpha: float = 0.05, k: int = 5) -> np.ndarray:
  """Indices of dimensions with more than k significant objects, sorted by the L1 norm of loc (descending)."""
  keep = np.flatnonzero(dimension_importance(loc, scale, alpha) > k)
  l1 = np.abs(np.asarray(loc)[:, keep]).sum(0)
  return keep[np.argsort(-l1, kind="stable")]


def converged(dims_history: list[int], ws: int) -> bool:
  """VICE's representational stability: the last ws pruned dimensionalities are equal and non-zero."""
  if len(dims_history) < ws:
    return False
  window = set(dims_history[-ws:])
  return len(window) == 1 and window.pop() != 0


# ----------------------------------------------------------------------------------------------------------------
# Posterior predictive.


@functools.partial(jax.jit, static_argnames=("samples",))
def _predictive(loc, scale, triplets, key, samples):
  def body(r, total):
    eps = jax.random.normal(jax.random.fold_in(key, r), loc.shape, loc.dtype)
    sims = triplet_math.triplet_similarities_jax(jax.nn.relu(loc + scale * eps), triplets)
    return total + jax.nn.softmax(sims, axis=-1)
  total = jax.lax.fori_loop(0, samples, body, jnp.zeros((triplets.shape[0], 3), jnp.float32))
  return total / samples


def posterior_predictive(loc: np.ndarray, scale: np.ndarray, triplets: np.ndarray, samples: int = 50,
                         seed: int = 0, chunk: int = 1 << 15) -> np.ndarray:
  """p*: the mean over `samples` posterior draws of softmax([s01, s02, s12]); (n, 3) float32, rows sum to 1.

  Sample r uses the key fold_in(key(seed), r) over the whole (m, d) embedding, so results are reproducible and
  independent of how triplets are chunked or which other triplets are scored.
  """
  if samples < 1:
    raise ValueError(f"mc_samples must be >= 1, got {samples}.")
  triplets = np.asarray(triplets, np.int64)
  loc = jnp.asarray(loc, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  key = jax.random.key(seed)
  out = np.empty((len(triplets), 3), np.float32)
  for start in range(0, len(triplets), chunk):
    part = triplets[start:start + chunk]
    padded = np.zeros((chunk if len(triplets) > chunk else len(part), 3), np.int64)
    padded[:len(part)] = part
    out[start:start + len(part)] = np.asarray(_predictive(loc, scale, jnp.asarray(padded), key, samples))[:len(part)]
  return out


# ----------------------------------------------------------------------------------------------------------------
# Training.


def _posterior(params: dict[str, jax.Array]) -> tuple[np.ndarray, np.ndarray]:
  """(loc, scale) as numpy; a SPoSE point embedding has scale 0."""
  loc = np.asarray(params["loc"])
  return loc, (np.exp(np.asarray(params["log_scale"])) if "log_scale" in params else np.zeros_like(loc))


def learning_rate(lr: float, lr_final: float, burnin: int, ws: int, steps_per_epoch: int) -> optax.ScalarOrSchedule:
  """lr until burn-in, then geometric decay to lr * lr_final over ws epochs (see ViceConfig.lr_final)."""
  if lr_final == 1.0:
    return lr
  start, span = burnin * steps_per_epoch, max(ws * steps_per_epoch, 1)

  def schedule(count: jax.Array) -> jax.Array:
    return lr * jnp.exp(math.log(lr_final) * jnp.clip((count - start) / span, 0.0, 1.0))
  return schedule


@functools.lru_cache(maxsize=16)
def _adam(lr: float, lr_final: float, burnin: int, ws: int, steps_per_epoch: int) -> optax.GradientTransformation:
  """One optimizer object per setting: it is a static jit argument, so restarts reuse the compiled epoch."""
  return optax.adam(learning_rate(lr, lr_final, burnin, ws, steps_per_epoch))


def fit(triplets: np.ndarray, n_objects: int, cfg: ViceConfig = ViceConfig(),
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        val_triplets: np.ndarray | None = None, init: dict[str, np.ndarray] | None = None) -> ViceResult:
  """Train VICE on (n, 3) training triplets (i, j, odd) over `n_objects` objects.

  Args:
    on_epoch: called after every epoch with {epoch, loss, nll, complexity, accuracy, dims} (train metrics are
      means over the epoch's batches, one posterior sample each; dims is the BH-pruned dimensionality), plus
      val_accuracy and val_nll on epochs where validation triplets were scored.
    val_triplets: optional held-out triplets, scored every cfg.eval_every epochs (and used by cfg.keep_best).

  Returns:
    The posterior parameters, sorted by the L1 norm of loc, pruned to the significant dimensions where cfg.prune
    applies (all dimensions if none is significant), and the history.
  """
  start = time.perf_counter()
  triplets = np.asarray(triplets, np.int64)
  if len(triplets) == 0:
    raise ValueError("VICE needs at least one training triplet.")
  if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.dims < 1:
    raise ValueError(f"batch_size, epochs and dims must be >= 1, got {cfg.batch_size}, {cfg.epochs}, {cfg.dims}.")
  if not 0.0 < cfg.pi < 1.0:
    raise ValueError(f"The spike weight pi must lie in (0, 1), got {cfg.pi}.")
  if cfg.prune not in PRUNE_MODES:
    raise ValueError(f"prune must be one of {PRUNE_MODES}, got {cfg.prune!r}.")
  if cfg.model not in MODELS:
    raise ValueError(f"model must be one of {MODELS}, got {cfg.model!r}.")
  if not 0.0 < cfg.lr_final <= 1.0:
    raise ValueError(f"lr_final is a fraction of lr in (0, 1], got {cfg.lr_final}.")
  params = init_params(n_objects, cfg.dims, cfg.seed, cfg.model) if init is None else {
      k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
  optimizer = _adam(cfg.lr, cfg.lr_final, cfg.burnin, cfg.ws, -(-len(triplets) // cfg.batch_size))
  opt_state = optimizer.init(params)
  data = jnp.asarray(triplets)
  rng = np.random.default_rng([cfg.seed, 1])
  key = jax.random.key(cfg.seed + 1)
  history: list[dict[str, Any]] = []
  dims_history: list[int] = []
  best: tuple[float, Any] = (float("inf"), None)
  is_converged = False
  epoch = since_best = 0
  for epoch in range(1, cfg.epochs + 1):
    rows, weights = _epoch_batches(len(triplets), cfg.batch_size, rng)
    params, opt_state, metrics = _train_epoch(
        params, opt_state, jax.random.fold_in(key, epoch), data[rows], jnp.asarray(weights),
        optimizer=optimizer, n_train=len(triplets), pi=cfg.pi, spike=cfg.spike, slab=cfg.slab, model=cfg.model,
        lmbda=cfg.lmbda)
    loc, scale = _posterior(params)
    dims_history.append(int((dimension_importance(loc, scale, cfg.alpha) > cfg.k).sum()))
    full = weights.sum(1) == cfg.batch_size  # Epoch means over full batches (the padded one is smaller).
    record = {"epoch": epoch, "dims": dims_history[-1],
              **{k: float(np.asarray(v)[full].mean() if full.any() else np.asarray(v).mean())
                 for k, v in metrics.items()}}
    if not np.isfinite(record["loss"]):
      raise FloatingPointError(f"VICE loss became {record['loss']} in epoch {epoch}; lower lr (now {cfg.lr}).")
    if val_triplets is not None and len(val_triplets) and (epoch % max(cfg.eval_every, 1) == 0
                                                           or epoch == cfg.epochs):
      p = posterior_predictive(loc, scale, val_triplets, 1 if cfg.model == "spose" else cfg.val_samples, cfg.seed)
      record["val_accuracy"], record["val_nll"] = triplet_math.odd_one_out_accuracy(p), triplet_math.human_pair_nll(p)
      if record["val_nll"] < best[0]:
        best, since_best = (record["val_nll"], (params, epoch)), 0
      else:
        since_best += 1
    history.append(record)
    if on_epoch is not None:
      on_epoch(record)
    if cfg.patience and since_best >= cfg.patience:
      break
    if epoch > cfg.burnin and converged(dims_history, cfg.ws):
      is_converged = True
      break
  best_epoch = None
  if cfg.keep_best and best[1] is not None:
    params, best_epoch = best[1]
  loc, scale = _posterior(params)
  significant = kept_dimensions(loc, scale, cfg.alpha, cfg.k)
  prune = cfg.prune == "always" or (cfg.prune == "converged" and is_converged)
  kept = significant if prune and len(significant) else np.argsort(-np.abs(loc).sum(0), kind="stable")
  if cfg.model == "spose":  # Lossless: drop only the dimensions the L1 penalty zeroed for every object.
    if not (loc > 0).any():
      raise ValueError(f"SPoSE collapsed: the L1 penalty drove every weight to 0 (lmbda {cfg.lmbda}, lr {cfg.lr}); "
                       "lower lmbda.")
    kept = kept[(loc[:, kept] > 0).any(0)]
  result = ViceResult(loc=loc[:, kept].astype(np.float32), scale=scale[:, kept].astype(np.float32), kept=kept,
                      epochs=epoch, converged=is_converged, history=history, best_epoch=best_epoch,
                      dims_significant=len(significant), seed=cfg.seed)
  if prune and cfg.refine > 0 and cfg.model == "vice":
    result = _refine(result, triplets, n_objects, cfg, on_epoch, val_triplets)
  if val_triplets is not None and len(val_triplets):
    p = posterior_predictive(result.loc, result.scale, val_triplets, 1 if cfg.model == "spose" else cfg.val_samples,
                             cfg.seed)
    result.val_nll, result.val_accuracy = triplet_math.human_pair_nll(p), triplet_math.odd_one_out_accuracy(p)
  result.seconds = time.perf_counter() - start
  return result


def _refine(result: ViceResult, triplets: np.ndarray, n_objects: int, cfg: ViceConfig,
            on_epoch: Callable[[dict[str, Any]], None] | None, val_triplets: np.ndarray | None) -> ViceResult:
  """cfg.refine more epochs on the pruned dimensions only (see ViceConfig.refine); dims_significant is re-tested."""
  # The step is annealed again, lr -> lr * lr_final over the refine epochs: the kept dimensions have a way to go.
  more = dataclasses.replace(cfg, dims=result.loc.shape[1], epochs=cfg.refine, burnin=0, ws=cfg.refine, prune="never",
                             refine=0, keep_best=False, patience=0)
  shift = lambda rec: {**rec, "epoch": rec["epoch"] + result.epochs, "refine": True}
  r = fit(triplets, n_objects, more, None if on_epoch is None else (lambda rec: on_epoch(shift(rec))), val_triplets,
          init={"loc": result.loc, "log_scale": np.log(result.scale)})
  return dataclasses.replace(r, kept=result.kept[r.kept], epochs=result.epochs + r.epochs, converged=True,
                             history=result.history + [shift(h) for h in r.history], seed=result.seed,
                             dims_significant=r.dims_significant)


def fit_restarts(triplets: np.ndarray, n_objects: int, cfg: ViceConfig = ViceConfig(), restarts: int = 1,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 val_triplets: np.ndarray | None = None) -> tuple[ViceResult, list[ViceResult]]:
  """`restarts` fits from seeds cfg.seed, cfg.seed + 1, ...; the one with the lowest validation NLL is kept.

  VICE's objective is non-convex (ReLU, spike-and-slab prior) and its authors train several seeds and select
  on held-out triplets; selection needs validation triplets unless there is only one restart.

  Returns:
    (the kept restart, every restart in seed order).
  """
  if restarts < 1:
    raise ValueError(f"seeds (restarts) must be >= 1, got {restarts}.")
  if restarts > 1 and (val_triplets is None or len(val_triplets) == 0):
    raise ValueError(f"{restarts} restarts need validation triplets to choose between them (val_fraction > 0).")
  results = []
  for r in range(restarts):
    callback = None if on_epoch is None else (lambda rec, r=r: on_epoch({**rec, "restart": r}))
    results.append(fit(triplets, n_objects, dataclasses.replace(cfg, seed=cfg.seed + r), callback, val_triplets))
  best = min(results, key=lambda res: (res.val_nll if res.val_nll is not None else 0.0, res.seed))
  return best, results


def accuracy_by_dims(loc: np.ndarray, scale: np.ndarray, triplets: np.ndarray, samples: int = 50, seed: int = 0,
                     dims: list[int] | None = None) -> list[dict[str, float]]:
  """Test accuracy and NLL of p* from the first d dimensions (stored sorted by importance) for each d: how much
  of the fit the leading dimensions carry (default d = 1..all, thinned to at most 25 points)."""
  total = loc.shape[1]
  if dims is None:
    dims = sorted({int(round(x)) for x in np.linspace(1, total, min(total, 25))})
  out = []
  for d in dims:  # Dropped dimensions zeroed (ReLU(0) adds nothing), not sliced: one compiled shape for all d.
    keep = (np.arange(total) < d).astype(np.float32)
    p = posterior_predictive(loc * keep, scale * keep, triplets, samples, seed)
    out.append({"dims": int(d), "accuracy": triplet_math.odd_one_out_accuracy(p),
                "nll": triplet_math.human_pair_nll(p)})
  return out
