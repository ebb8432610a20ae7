"""Few-shot linear probing of frozen representations (paper: "Alignment improves generalization", Fig. 4).

Protocol: for k shots, draw k training examples from each class that has more than k (the others are left
out and counted), train a linear probe on them and test on every remaining example of those classes. The draw
is seeded per (seed, k, repeat), so two models evaluated with one seed see the same split (a paired
comparison). Features are centred on the training mean and L2-normalised (as big_vision's few-shot evaluator
does), so the probe is insensitive to the representation's scale.

Probes:
* "ridge" (default): closed-form ridge regression onto +-1 one-hot targets, predict the arg max (big_vision's
  few-shot linear probe); solved in the dual when there are fewer examples than dimensions.
* "logistic": multinomial logistic regression with L2 penalty, full-batch Adam (optax) for `steps` steps.
Accuracy per repeat with a binomial Wald 95% CI (n = test examples); the headline is the mean over repeats.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignet_data.evaluation import metrics

PROBES = ("ridge", "logistic")


def sample_shots(labels: np.ndarray, k: int, seed: int, repeat: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """(train indices: k per eligible class, test indices: the rest of those classes, classes left out)."""
  labels = np.asarray(labels)
  if k < 1:
    raise ValueError(f"Shots must be >= 1, got {k}.")
  rng = np.random.default_rng([seed, k, repeat])
  train, test, skipped = [], [], 0
  for c in np.unique(labels[labels >= 0]):
    idx = np.flatnonzero(labels == c)
    if len(idx) <= k:
      skipped += 1
      continue
    perm = rng.permutation(idx)
    train.append(perm[:k])
    test.append(perm[k:])
  if not train:
    raise ValueError(f"No class has more than {k} labelled examples: {k}-shot probing needs a test example per class.")
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test)), skipped


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mean = train.mean(axis=0, keepdims=True)
  out = []
  for x in (train, test):
    x = x - mean
    out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
  return out[0], out[1]


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                  l2: float = 1.0) -> np.ndarray:
  """Closed-form ridge regression onto +-1 one-hot targets; returns the test predictions (class indices)."""
  x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
  y = 2.0 * np.eye(n_classes)[y_train] - 1.0
  n, d = x_train.shape
  if n < d:  # Dual: W = X^T (X X^T + l2 I)^-1 Y.
    w = x_train.T @ np.linalg.solve(x_train @ x_train.T + l2 * np.eye(n), y)
  else:
    w = np.linalg.solve(x_train.T @ x_train + l2 * np.eye(d), x_train.T @ y)
  return (x_test @ w).argmax(axis=1)


@functools.lru_cache(maxsize=4)
def _logistic_fit(steps: int, learning_rate: float) -> Callable[..., Any]:
  """One jitted full-batch Adam fit per (steps, learning rate); jax caches it per input shape."""
  import jax
  import jax.numpy as jnp
  import optax

  tx = optax.adam(learning_rate)

  def fit(x, y, w0, b0, l2):
    def loss(p):
      logits = x @ p["w"] + p["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(p["w"] ** 2)

    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    p = {"w": w0, "b": b0}
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    return p
  return jax.jit(fit)


def logistic_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                     l2: float = 1e-3, steps: int = 300, learning_rate: float = 0.1) -> np.ndarray:
  """Multinomial logistic regression (weights + bias, L2 on the weights), full-batch Adam (optax)."""
  d = x_train.shape[1]
  p = _logistic_fit(int(steps), float(learning_rate))(
      np.asarray(x_train, np.float32), np.asarray(y_train, np.int32), np.zeros((d, n_classes), np.float32),
      np.zeros((n_classes,), np.float32), np.float32(l2))
  return (np.asarray(x_test, np.float32) @ np.asarray(p["w"]) + np.asarray(p["b"])).argmax(axis=1)


def few_shot(x: np.ndarray, labels: np.ndarray, shots: Sequence[int] = (1, 10), *, repeats: int = 5, seed: int = 0,
             probe: str = "ridge", l2: float | None = None) -> dict[str, Any]:
  """{f"{k}shot": {accuracy, ci (Wald, n = test examples), n, n_train, classes, classes_skipped, repeats}}."""
  if probe not in PROBES:
    raise ValueError(f"Unknown probe {probe!r}; choose one of {PROBES}.")
  x, labels = np.asarray(x), np.asarray(labels)
  if len(x) != len(labels):
    raise ValueError(f"Probing needs one label per representation: {len(x)} vectors, {len(labels)} labels.")
  if not (labels >= 0).any():
    raise ValueError("Probing needs labelled examples; every label is missing (-1).")
  classes = np.unique(labels[labels >= 0])
  y_all = np.searchsorted(classes, np.where(labels >= 0, labels, classes[0]))
  out: dict[str, Any] = {}
  for k in shots:
    accs, n_test = [], 0
    for r in range(repeats):
      tr, te, skipped = sample_shots(labels, int(k), seed, r)
      a, b = _normalise(x[tr].astype(np.float64), x[te].astype(np.float64))
      if probe == "ridge":
        pred = ridge_predict(a, y_all[tr], b, len(classes), 1.0 if l2 is None else l2)
      else:
        pred = logistic_predict(a, y_all[tr], b, len(classes), 1e-3 if l2 is None else l2)
      accs.append(float((pred == y_all[te]).mean()))
      n_test = len(te)
    acc = float(np.mean(accs))
    out[f"{k}shot"] = {"accuracy": acc, "ci": metrics.wald_ci(acc, n_test), "ci_method": metrics.WALD, "n": int(n_test),
                       "n_train": int(len(tr)), "classes": int(len(classes) - skipped),
                       "classes_skipped": int(skipped), "repeats": accs, "probe": probe}
  return out


def correct_vector(x: np.ndarray, labels: np.ndarray, k: int, *, seed: int = 0, probe: str = "ridge",
                   l2: float | None = None) -> np.ndarray:
  """(n,) 1/0 per test example of the first repeat (NaN for training examples): for paired comparisons."""
  labels = np.asarray(labels)
  classes = np.unique(labels[labels >= 0])
  y_all = np.searchsorted(classes, np.where(labels >= 0, labels, classes[0]))
  tr, te, _ = sample_shots(labels, k, seed, 0)
  a, b = _normalise(np.asarray(x)[tr].astype(np.float64), np.asarray(x)[te].astype(np.float64))
  fn = ridge_predict if probe == "ridge" else logistic_predict
  pred = fn(a, y_all[tr], b, len(classes), (1.0 if probe == "ridge" else 1e-3) if l2 is None else l2)
  out = np.full(len(labels), np.nan)
  out[te] = (pred == y_all[te]).astype(np.float64)
  return out
