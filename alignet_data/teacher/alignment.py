"""Uncertainty distillation: an affine map of teacher features into the human similarity space.

Paper, Methods ("Hard-alignment loss", "Soft-alignment loss", "Uncertainty distillation"), following gLocal's
global transform (github.com/LukasMut/gLocal, `GlobalProbe`):

* features are z-scored with ONE scalar mean and std over the whole THINGS feature matrix;
* x' = z(x) W + b; pair similarities are dot products; q = softmax([s01, s02, s12]) (tau = 1);
* hard alignment: NLL of the human pair (`triplet_math`'s convention); soft alignment: the
  cross-entropy against the VICE posterior predictive p* (equal to KL(p* || q) up to the entropy of p*);
* objective = loss + lambda ||W - T||_F^2 with T = I (the paper) or mean(diag W) I (gLocal's "eye"); the bias
  is not regularised unless asked;
* Adam with gradient clipping, early stopping on a validation split of the training triplets; lambda chosen by
  k-fold cross-validation over OBJECT folds (`things.fold_splits`), then a final fit on all training triplets.

Speed (the real THINGS data: 124k triplets, p = 384, 9 lambdas x 3 folds in ~5 min on 2 busy CPU cores): steps
are full-batch by default (gLocal takes minibatch epochs) and all lambdas of a fit run vectorised. A step costs
the transform and Gram matrix of the objects, not of the triplets: logits are read off X' X'^T, so the backward
pass scatters scalars into an m x m matrix instead of rows (XLA's row scatter is slow on CPU), and a fold fits
only its own objects. On the real data the held-out loss bottoms out after 30-100 full-batch steps.

W starts at `init_scale` * I as in gLocal: z-scored features give dot products of the order of the feature
dimension, so starting at I would saturate the softmax.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignet_data import triplet_math
from alignet_data.human import things
from alignet_data.teacher.transform import Transform

DEFAULT_LAMBDAS = (1e3, 1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
LOSSES = ("soft", "hard")
TARGETS = ("identity", "scaled_identity")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  loss: str = "soft"                 # soft | hard
  target: str = "identity"           # identity (paper) | scaled_identity (gLocal "eye")
  lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
  folds: int = 3                     # Object folds for selecting lambda.
  select_by: str = "loss"            # CV criterion: held-out "loss" (lower is better) or "accuracy".
  lr: float = 1e-3
  batch_size: int = 0                # Triplets per Adam step; <= 0: full batch (an epoch is one step).
  max_epochs: int = 500
  min_epochs: int = 5                # No early stop before this many epochs.
  patience: int = 20                 # Epochs without a val-loss improvement of min_delta before stopping.
  min_delta: float = 1e-4
  clip_norm: float = 1.0             # Global gradient-norm clipping.
  val_fraction: float = 0.1          # Training triplets held out (by object set) for early stopping.
  init_scale: float = 1e-3           # W starts at init_scale * I, b at 0.
  use_bias: bool = True
  regularise_bias: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"Unknown alignment loss {self.loss!r}; use one of {LOSSES}.")
    if self.target not in TARGETS:
      raise ValueError(f"Unknown regulariser target {self.target!r}; use one of {TARGETS}.")
    if self.select_by not in ("loss", "accuracy"):
      raise ValueError(f"select_by must be 'loss' or 'accuracy', got {self.select_by!r}.")
    if not self.lambdas or any(lam < 0 for lam in self.lambdas):
      raise ValueError(f"lambdas must be a non-empty list of non-negative numbers, got {self.lambdas}.")


# ----------------------------------------------------------------------------------------------------------------
# Pure functions.


def zscore_stats(features: np.ndarray) -> tuple[float, float]:
  """One scalar mean and std over the whole (m, p) feature matrix (gLocal), computed in float64."""
  x = np.asarray(features, np.float64)
  std = float(x.std())
  if not np.isfinite(std) or std == 0:
    raise ValueError(f"Features have std {std}: constant or non-finite features cannot be z-scored.")
  return float(x.mean()), std


def init_params(dim: int, init_scale: float = 1e-3) -> dict[str, jax.Array]:
  return {"weights": init_scale * jnp.eye(dim, dtype=jnp.float32), "bias": jnp.zeros(dim, jnp.float32)}


def transform(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """x W + b of (already z-scored) features."""
  return x @ params["weights"] + params["bias"]


def hard_loss(logits: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean NLL of the human pair (`triplet_math.human_pair_nll_jax`)."""
  return _mean(triplet_math.human_pair_nll_jax(logits), weights)


def soft_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy -sum_pair p*(pair) log q(pair) against soft labels p* (n, 3)."""
  rows = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return _mean(rows, weights)


def kl_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean KL(p* || q): the soft loss minus the (constant) entropy of p*."""
  rows = triplet_math.kl_divergence_jax(jnp.log(targets), jax.nn.log_softmax(logits, axis=-1))
  return _mean(rows, weights)


def _mean(rows: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return jnp.mean(rows)
  return jnp.sum(weights * rows) / jnp.maximum(jnp.sum(weights), 1.0)


def regulariser(weights: jax.Array, lam: float | jax.Array, target: str = "identity") -> jax.Array:
  """lambda ||W - T||_F^2 with T = I or mean(diag W) I (gradient flows through the mean, as in gLocal)."""
  eye = jnp.eye(weights.shape[0], weights.shape[1], dtype=weights.dtype)
  if target == "identity":
    t = eye
  elif target == "scaled_identity":
    t = jnp.mean(jnp.diag(weights)) * eye
  else:
    raise ValueError(f"Unknown regulariser target {target!r}; use one of {TARGETS}.")
  return lam * jnp.sum((weights - t) ** 2)


def uses_gram(n_objects: int, dim: int, n_triplets: int) -> bool:
  """Whether transforming all objects and taking their Gram matrix (m p^2 + m^2 p multiply-adds) is cheaper than
  transforming the 3n rows of the triplets (3n p^2). The Gram path also avoids XLA's slow row scatter-add in the
  backward pass (its gradient scatters 3n scalars into an m x m matrix instead)."""
  return 3 * n_triplets * dim >= n_objects * (dim + n_objects)


def triplet_logits(params: dict[str, jax.Array], features: jax.Array, triplets: jax.Array) -> jax.Array:
  """[s01, s02, s12] of transformed features, by whichever path is cheaper (see `uses_gram`)."""
  if uses_gram(features.shape[0], features.shape[1], triplets.shape[0]):
    x = transform(params, features)
    return triplet_math.matrix_similarities_jax(x @ x.T, triplets)
  x = transform(params, features[triplets.reshape(-1)]).reshape(*triplets.shape, -1)
  return triplet_math.pair_similarities_jax(x)


def penalty(params: dict[str, jax.Array], lam: float | jax.Array, target: str = "identity",
            regularise_bias: bool = False) -> jax.Array:
  """lambda ||W - T||^2 (+ lambda ||b||^2 if asked)."""
  reg = regulariser(params["weights"], lam, target)
  if regularise_bias:
    reg = reg + lam * jnp.sum(params["bias"] ** 2)
  return reg


def objective(params: dict[str, jax.Array], features: jax.Array, triplets: jax.Array, targets: jax.Array,
              weights: jax.Array, lam: jax.Array, target: str = "identity",
              regularise_bias: bool = False) -> jax.Array:
  """Soft loss (hard labels are one-hot targets) + lambda ||W - T||^2 (+ lambda ||b||^2 if asked)."""
  loss = soft_loss(triplet_logits(params, features, triplets), targets, weights)
  return loss + penalty(params, lam, target, regularise_bias)


def hard_targets(n: int) -> np.ndarray:
  """One-hot soft labels of the human pair: the hard loss as a special case of the soft one."""
  t = np.zeros((n, 3), np.float32)
  t[:, triplet_math.HUMAN_PAIR] = 1.0
  return t


# ----------------------------------------------------------------------------------------------------------------
# Fitting.


@functools.lru_cache(maxsize=16)
def _optimizer(lr: float, clip_norm: float) -> optax.GradientTransformation:
  """Cached: an equal optimizer object lets every fit with these settings reuse the compiled steps."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(lr))


def _grads(params, features, triplets, targets, weights, lam, target, regularise_bias, use_bias, val=None):
  """Gradient of the objective; with `val` (triplets, targets) also the validation loss of the same params, read
  off the same Gram matrix (free in the full-batch step)."""
  def f(p):
    if val is None:
      return objective(p, features, triplets, targets, weights, lam, target, regularise_bias), jnp.float32(0)
    x = transform(p, features)
    sims = x @ x.T
    loss = soft_loss(triplet_math.matrix_similarities_jax(sims, triplets), targets, weights)
    val_sims = triplet_math.matrix_similarities_jax(jax.lax.stop_gradient(sims), val[0])
    return loss + penalty(p, lam, target, regularise_bias), soft_loss(val_sims, val[1], val[2])

  (_, val_loss), grads = jax.value_and_grad(f, has_aux=True)(params)
  if not use_bias:
    grads = {**grads, "bias": jnp.zeros_like(grads["bias"])}
  return grads, val_loss


def _keep_best(params, best, best_loss, val_loss, active, min_delta):
  """Per lambda: the params with the lowest validation loss so far (improvement must exceed min_delta)."""
  improved = active & (val_loss < best_loss - min_delta)
  pick = lambda new, old: jnp.where(improved.reshape(-1, *[1] * (new.ndim - 1)), new, old)
  return jax.tree.map(pick, params, best), jnp.where(improved, val_loss, best_loss), improved


_STATIC = ("optimizer", "target", "regularise_bias", "use_bias")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _full_batch_step(state, features, triplets, targets, weights, val, lams, active, min_delta, *, optimizer,
                     target, regularise_bias, use_bias):
  """One Adam step of every lambda (leading L axis) on all training triplets, after scoring the current params on
  the validation triplets and keeping the best: (params, opt_state, best, best_loss) -> same, val_loss, improved."""
  params, opt_state, best, best_loss = state

  def update(params, opt_state, lam):
    grads, val_loss = _grads(params, features, triplets, targets, weights, lam, target, regularise_bias, use_bias,
                             val)
    updates, opt_state = optimizer.update(grads, opt_state, params)  # Clipping is per lambda (inside vmap).
    return optax.apply_updates(params, updates), opt_state, val_loss

  new_params, opt_state, val_loss = jax.vmap(update)(params, opt_state, lams)
  best, best_loss, improved = _keep_best(params, best, best_loss, val_loss, active, min_delta)
  return (new_params, opt_state, best, best_loss), val_loss, improved


@functools.partial(jax.jit, static_argnames=_STATIC)
def _minibatch_steps(params, opt_state, features, batches, targets, weights, lams, *, optimizer, target,
                     regularise_bias, use_bias):
  """A chunk of minibatch steps for a stack of L lambdas; every lambda sees the same batches."""
  def update(params, opt_state, batch, tgt, w, lam):
    grads, _ = _grads(params, features, batch, tgt, w, lam, target, regularise_bias, use_bias)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def step(carry, inputs):
    batch, tgt, w = inputs
    run = lambda c: jax.vmap(update, in_axes=(0, 0, None, None, None, 0))(*c, batch, tgt, w, lams)
    return jax.lax.cond(jnp.any(w > 0), run, lambda c: c, carry), None  # All-padding batches are no-ops.

  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (batches, targets, weights))
  return params, opt_state


def _evaluate(params, features, triplets, targets, weights):
  logits = triplet_logits(params, features, triplets)
  return soft_loss(logits, targets, weights), _mean(triplet_math.odd_one_out_correct_jax(logits), weights)


_evaluate_one = jax.jit(_evaluate)
_evaluate_many = jax.jit(jax.vmap(_evaluate, in_axes=(0, None, None, None, None)))


@jax.jit
def _track(params, best, best_loss, features, val, active, min_delta):
  val_loss = _evaluate_many(params, features, *val)[0]
  best, best_loss, improved = _keep_best(params, best, best_loss, val_loss, active, min_delta)
  return best, best_loss, val_loss, improved


_SCAN_BATCHES = 16  # Minibatches per compiled scan: every fit, whatever its size, reuses one compiled chunk.


def _padded(triplets: np.ndarray, targets: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rows padded to a power of two (>= 256) with weight 0, so evaluation compiles once per size bucket."""
  n = len(triplets)
  size = max(256, 1 << max(n - 1, 0).bit_length())
  t = np.zeros((size, 3), np.int32)
  y = np.zeros((size, 3), np.float32)
  w = np.zeros(size, np.float32)
  t[:n], y[:n], w[:n] = triplets, targets, 1.0
  return jnp.asarray(t), jnp.asarray(y), jnp.asarray(w)


def used_objects(features: np.ndarray, triplets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Only the objects the triplets show, and the triplets re-indexed into them: a CV fold's fit then costs the
  Gram matrix of its own objects (4/9 of all of them for 3 folds), not of all objects."""
  used = np.unique(np.asarray(triplets))
  return np.asarray(features)[used], np.searchsorted(used, triplets).astype(np.int32)


def fit_many(features: np.ndarray, triplets: np.ndarray, targets: np.ndarray, lambdas: Sequence[float],
             cfg: AlignConfig = AlignConfig(), seed: int | None = None
             ) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
  """Fit W, b on z-scored features for each lambda, all lambdas in one vectorised run.

  batch_size <= 0 (the default) takes full-batch Adam steps (an "epoch" is one step): on CPU a step on all
  triplets costs about as much as one minibatch, since it is dominated by the transform and Gram matrix of the
  objects. Early stopping is per lambda, on a validation split of the triplets that shares no object set with
  the rest: a lambda stops when its validation loss has not improved by min_delta for `patience` epochs (after
  min_epochs), and returns the parameters of its best epoch (0: the initial ones). Stopped lambdas leave the
  vectorised run once half of them have stopped. The result for a lambda is the same as fitting it alone.

  Returns:
    Per lambda: (params as numpy, {epochs, best_epoch, val_loss}).
  """
  seed = cfg.seed if seed is None else seed
  targets = np.asarray(targets, np.float32)
  if len(triplets) < 2:
    raise ValueError(f"Need at least 2 triplets to fit a transform, got {len(triplets)}.")
  features, triplets = used_objects(features, triplets)
  if cfg.val_fraction > 0:
    fit_idx, val_idx = things.split_train_test(triplets, cfg.val_fraction, seed)
  else:
    fit_idx = val_idx = np.arange(len(triplets))
  # Objects padded with unused zero rows to a multiple of 64, triplets to a power of two with weight 0: CV folds
  # and fits of similar size share compiled steps (compiling dominates small fits on a loaded CPU).
  x = np.zeros((-(-len(features) // 64) * 64, features.shape[1]), np.float32)
  x[:len(features)] = features
  x = jnp.asarray(x)
  val = _padded(triplets[val_idx], targets[val_idx])
  n = len(fit_idx)
  full = cfg.batch_size <= 0 or cfg.batch_size >= n
  static = {"optimizer": _optimizer(cfg.lr, cfg.clip_norm), "target": cfg.target,
            "regularise_bias": cfg.regularise_bias, "use_bias": cfg.use_bias}
  slots = np.arange(len(lambdas))  # Which lambda each row of the vectorised state fits.
  lams = jnp.asarray(lambdas, jnp.float32)
  params = jax.tree.map(lambda a: jnp.repeat(a[None], len(slots), 0), init_params(x.shape[1], cfg.init_scale))
  state = (params, jax.vmap(static["optimizer"].init)(params), params, jnp.full(len(slots), jnp.inf))
  min_delta = jnp.float32(cfg.min_delta)
  if full:
    fit_t, fit_y, fit_w = _padded(triplets[fit_idx], targets[fit_idx])
  else:
    rng = np.random.default_rng([seed, 2])
    bs = cfg.batch_size
    n_batches = -(-n // (bs * _SCAN_BATCHES)) * _SCAN_BATCHES
    w = np.zeros(n_batches * bs, np.float32)
    w[:n] = 1.0
    w = w.reshape(-1, _SCAN_BATCHES, bs)
  best_loss = np.full(len(slots), np.inf)
  best_epoch = np.zeros(len(slots), np.int64)
  bad = np.zeros(len(slots), np.int64)
  active = np.ones(len(slots), bool)
  results: list[Any] = [None] * len(lambdas)
  for epoch in range(cfg.max_epochs + 1):  # Score the params after `epoch` epochs, then train one more.
    train = epoch < cfg.max_epochs
    if full and train:
      state, val_loss, improved = _full_batch_step(state, x, fit_t, fit_y, fit_w, val, lams, jnp.asarray(active),
                                                   min_delta, **static)
    else:
      params, opt_state, best, _ = state
      best, loss_now, val_loss, improved = _track(params, best, state[3], x, val, jnp.asarray(active), min_delta)
      state = (params, opt_state, best, loss_now)
      if train:
        order = np.zeros(n_batches * bs, np.int64)
        order[:n] = fit_idx[rng.permutation(n)]
        batches = triplets[order].reshape(-1, _SCAN_BATCHES, bs, 3)
        batch_targets = targets[order].reshape(-1, _SCAN_BATCHES, bs, 3)
        for c in range(len(batches)):
          params, opt_state = _minibatch_steps(params, opt_state, x, jnp.asarray(batches[c]),
                                               jnp.asarray(batch_targets[c]), jnp.asarray(w[c]), lams, **static)
        state = (params, opt_state, *state[2:])
    val_loss, improved = np.asarray(val_loss, np.float64), np.asarray(improved)
    if not np.all(np.isfinite(val_loss[active])):
      lam = np.asarray(lambdas)[slots[active & ~np.isfinite(val_loss)]]
      raise FloatingPointError(f"Alignment loss became non-finite after {epoch} epochs (lambda {lam.tolist()}); "
                               f"lower lr (now {cfg.lr}).")
    best_loss[improved] = val_loss[improved]
    best_epoch[improved] = epoch
    bad = np.where(improved, 0, bad + 1)
    done = active & ((not train) | ((epoch >= cfg.min_epochs) & (bad >= cfg.patience)))
    for i in np.flatnonzero(done):
      results[slots[i]] = ({k: np.asarray(v[i]) for k, v in state[2].items()},
                           {"epochs": epoch, "best_epoch": int(best_epoch[i]), "val_loss": float(best_loss[i])})
    active &= ~done
    if not active.any():
      break
    if active.sum() <= len(slots) // 2:  # Drop stopped lambdas from the vectorised run.
      keep = np.flatnonzero(active)
      state = jax.tree.map(lambda a, keep=keep: a[keep], state)
      slots, lams, best_loss, best_epoch, bad, active = (slots[keep], lams[keep], best_loss[keep], best_epoch[keep],
                                                          bad[keep], active[keep])
  return results


def fit(features: np.ndarray, triplets: np.ndarray, targets: np.ndarray, lam: float,
        cfg: AlignConfig = AlignConfig(), seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Fit W, b on z-scored features for one lambda (see `fit_many`)."""
  return fit_many(features, triplets, targets, [lam], cfg, seed)[0]


def score(params: dict[str, np.ndarray], features: np.ndarray, triplets: np.ndarray,
          targets: np.ndarray) -> dict[str, float]:
  """Held-out loss (cross-entropy vs targets) and odd-one-out accuracy (ties wrong) of a fitted transform."""
  if len(triplets) == 0:
    return {"loss": float("nan"), "accuracy": float("nan")}
  features, triplets = used_objects(features, triplets)
  loss, acc = _evaluate_one({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(features, jnp.float32),
                            *_padded(triplets, np.asarray(targets)))
  return {"loss": float(loss), "accuracy": float(acc)}


def cross_validate(features: np.ndarray, triplets: np.ndarray, targets: np.ndarray, cfg: AlignConfig = AlignConfig(),
                   on_fit: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
  """Score every lambda by k-fold CV over object folds; one record per lambda with the mean held-out scores."""
  n_objects = features.shape[0]
  folds = things.object_folds(n_objects, cfg.folds, cfg.seed)
  splits = list(things.fold_splits(triplets, folds))
  for fold, train_idx, held_idx in splits:
    if len(train_idx) < 2 or len(held_idx) == 0:
      raise ValueError(f"Object fold {fold} leaves {len(train_idx)} training and {len(held_idx)} held-out "
                       f"triplets: too few triplets for {cfg.folds}-fold CV; use fewer folds or more triplets.")
  per_lambda: list[list[dict[str, Any]]] = [[] for _ in cfg.lambdas]
  for fold, train_idx, held_idx in splits:
    fits = fit_many(features, triplets[train_idx], targets[train_idx], cfg.lambdas, cfg, seed=cfg.seed + fold)
    for i, (lam, (params, info)) in enumerate(zip(cfg.lambdas, fits, strict=True)):
      s = score(params, features, triplets[held_idx], targets[held_idx])
      per_lambda[i].append({"fold": fold, "train": len(train_idx), "held_out": len(held_idx), **s, **info})
      if on_fit is not None:
        on_fit({"lambda": lam, **per_lambda[i][-1]})
  return [{"lambda": lam, "loss": float(np.mean([f["loss"] for f in folds])),
           "accuracy": float(np.mean([f["accuracy"] for f in folds])), "folds": folds}
          for lam, folds in zip(cfg.lambdas, per_lambda, strict=True)]


def select_lambda(cv: Sequence[dict[str, Any]], by: str = "loss") -> float:
  """The lambda with the best mean held-out score (lowest loss or highest accuracy; ties -> the larger lambda,
  the stronger pull towards the pretrained geometry)."""
  key = (lambda r: (r["loss"], -r["lambda"])) if by == "loss" else (lambda r: (-r["accuracy"], -r["lambda"]))
  return float(min(cv, key=key)["lambda"])


def align(features: np.ndarray, triplets: np.ndarray, targets: np.ndarray | None = None,
          cfg: AlignConfig = AlignConfig(), on_fit: Callable[[dict[str, Any]], None] | None = None
          ) -> tuple[Transform, dict[str, Any]]:
  """Select lambda by object-fold CV (skipped for a single lambda), then fit on all training triplets.

  Args:
    features: (m, p) raw teacher features in object order.
    triplets: (n, 3) training triplets (i, j, odd).
    targets: (n, 3) soft labels p* for cfg.loss == "soft"; ignored (one-hot of the human pair) for "hard".

  Returns:
    The transform (W, b and the z-scoring mean/std) and {lambda, cv, final fit info}.
  """
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"Features must be an (n_objects, dim) matrix, got shape {features.shape}.")
  triplets = things.validate_triplets(triplets, features.shape[0], "training triplets")
  if cfg.loss == "soft":
    if targets is None:
      raise ValueError("loss='soft' needs soft labels p* (a human artifact); use loss='hard' without them.")
    targets = np.asarray(targets, np.float32)
    if targets.shape != (len(triplets), 3):
      raise ValueError(f"Soft labels have shape {targets.shape}, expected {(len(triplets), 3)}.")
  else:
    targets = hard_targets(len(triplets))
  mean, std = zscore_stats(features)
  z = ((features - mean) / std).astype(np.float32)
  cv: list[dict[str, Any]] = []
  if len(cfg.lambdas) > 1:
    cv = cross_validate(z, triplets, targets, cfg, on_fit)
    lam = select_lambda(cv, cfg.select_by)
  else:
    lam = float(cfg.lambdas[0])
  params, info = fit(z, triplets, targets, lam, cfg)
  if on_fit is not None:
    on_fit({"lambda": lam, "fold": "final", **info})
  t = Transform(params["weights"].astype(np.float32), params["bias"].astype(np.float32), mean, std)
  return t, {"lambda": lam, "cv": cv, "final": info}


def evaluate(features: np.ndarray, triplets: np.ndarray, soft_labels: np.ndarray | None = None) -> dict[str, float]:
  """Odd-one-out accuracy vs the human choice (ties wrong), NLL of the human pair, and KL(p* || q) when soft
  labels are given, of dot products of (already transformed) features on (i, j, odd) triplets."""
  sims = triplet_math.triplet_similarities(np.asarray(features, np.float64), triplets)
  logq = triplet_math.log_softmax(sims)
  out = {"accuracy": triplet_math.odd_one_out_accuracy(sims), "nll": float(-logq[:, triplet_math.HUMAN_PAIR].mean())}
  if soft_labels is not None:  # From log q directly: raw features can underflow q to 0 (an infinite KL).
    p = np.asarray(soft_labels, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
      out["kl"] = float(np.where(p > 0, p * (np.log(p) - logq), 0.0).sum(-1).mean())
  return out
