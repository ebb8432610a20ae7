"""Trains the demo teacher and demo student: tiny ViTs classifying the demo world's pool at the basic level.

    python -m alignet_data.demo_models [--out DIR]      # ~2 minutes on 2 CPU cores

writes `demo_teacher.npz`, `demo_student.npz` (flat big_vision-style checkpoints) and `demo_models.json`
(configs, training settings, train / held-out accuracy) into DIR (default: the package's `checkpoints/`).

Both see only basic-level labels (`pool_labels`), like an ImageNet classifier. In the demo world, colour and
background are shared across superordinates, so their representations group images by appearance rather than
by superordinate: misaligned at the coarse level, which is what AligNet is meant to fix. The teacher is the
better model (wider, deeper, MAP pooling like SigLIP, trained longer); the student is the smaller pretrained
model AligNet fine-tunes. Everything is seeded: the same machine and library versions give the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignet_data import models
from alignet_data.models import registry

HELDOUT_PER_CLASS = 30
SPLIT_SEED = 1234
# Training settings per demo model: config name, steps, batch, peak learning rate, weight decay, seed.
TRAIN: dict[str, dict[str, Any]] = {
    "teacher": {"config": "vit-demo-teacher", "steps": 500, "batch_size": 128, "learning_rate": 2e-3,
                "weight_decay": 0.05, "warmup_steps": 50, "seed": 0, "file": "demo_teacher.npz"},
    # The student is pretrained briefly (~70% held-out): a weaker model than the teacher, with room to learn from
    # it, as the paper's weaker base models had (e.g. CapPa at the class boundary).
    "student": {"config": "vit-demo-student", "steps": 180, "batch_size": 128, "learning_rate": 2e-3,
                "weight_decay": 0.05, "warmup_steps": 18, "seed": 1, "file": "demo_student.npz"},
}
REPORT_FILE = "demo_models.json"


def split(labels: np.ndarray, heldout_per_class: int = HELDOUT_PER_CLASS, seed: int = SPLIT_SEED
          ) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic per-class split of pool indices into (train, held-out), each sorted."""
  rng = np.random.default_rng(seed)
  heldout = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) <= heldout_per_class:
      raise ValueError(f"class {c} has {len(idx)} images, need more than heldout_per_class={heldout_per_class}")
    heldout.append(rng.permutation(idx)[:heldout_per_class])
  heldout = np.sort(np.concatenate(heldout))
  train = np.setdiff1d(np.arange(len(labels)), heldout)
  return train, heldout


def _augment(key: jax.Array, x: jnp.ndarray, pad: int = 4) -> jnp.ndarray:
  """Random horizontal flip and translation by up to `pad` pixels (edge padding), per image."""
  n, h, w, _ = x.shape
  k_flip, k_shift = jax.random.split(key)
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  x = jnp.where(flip, x[:, :, ::-1], x)
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  shifts = jax.random.randint(k_shift, (n, 2), 0, 2 * pad + 1)
  crop = lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(x, shifts)


def make_optimizer(steps: int, learning_rate: float, warmup_steps: int, weight_decay: float
                   ) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def train_classifier(config: dict[str, Any], images: np.ndarray, labels: np.ndarray, *, steps: int,
                     batch_size: int, learning_rate: float, weight_decay: float, warmup_steps: int, seed: int,
                     progress: bool = False) -> tuple[models.LoadedModel, list[float]]:
  """Trains a ViT classifier (softmax cross-entropy) from scratch; returns the model and per-step losses.

  `images` are uint8 NHWC; they go through the model's own preprocessing once, then are augmented per step.
  """
  model = models.build(config, seed=seed)
  x_all = jnp.asarray(model.preprocess(images))
  y_all = jnp.asarray(labels, jnp.int32)
  tx = make_optimizer(steps, learning_rate, warmup_steps, weight_decay)
  opt_state = tx.init(model.params)

  def loss_fn(params, x, y):
    logits, _ = model.apply(params, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_aug = jax.random.split(key)
    idx = jax.random.choice(k_idx, x_all.shape[0], (batch_size,), replace=False)
    x = _augment(k_aug, x_all[idx])
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y_all[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, losses = model.params, []
  key = jax.random.PRNGKey(seed)
  bar = range(steps)
  if progress:
    from tqdm import tqdm
    bar = tqdm(bar, desc=f"train {config.get('name', 'vit')}", mininterval=2.0)
  for i in bar:
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
    losses.append(loss)
  losses = [float(v) for v in jax.device_get(losses)]
  model.params = params
  return model, losses


def accuracy(model: models.LoadedModel, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
  """Top-1 classification accuracy of a model with a head, on uint8 images."""
  fn = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x)[0], -1))
  preds = np.concatenate([np.asarray(fn(model.params, model.preprocess(images[i:i + batch_size])))
                          for i in range(0, len(images), batch_size)])
  return float(np.mean(preds == labels))


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def train_demo_models(out_dir: str, which: Sequence[str] = ("teacher", "student"), world: Any = None,
                      progress: bool = True) -> dict[str, Any]:
  """Trains the demo models on the default demo world and writes checkpoints + report into `out_dir`."""
  from alignet_data import demo_world
  world = world if world is not None else demo_world.make_world(demo_world.WorldConfig())
  train_idx, heldout_idx = split(world.pool_labels)
  os.makedirs(out_dir, exist_ok=True)
  report_path = os.path.join(out_dir, REPORT_FILE)
  report: dict[str, Any] = {}
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
  report["split"] = {"heldout_per_class": HELDOUT_PER_CLASS, "seed": SPLIT_SEED, "train": len(train_idx),
                     "heldout": len(heldout_idx), "world_config": dict(world.config)}
  for name in which:
    settings = TRAIN[name]
    config = models.get_config(settings["config"], num_classes=int(world.n_basic))
    t0 = time.time()
    model, losses = train_classifier(
        config, world.pool_images[train_idx], world.pool_labels[train_idx], steps=settings["steps"],
        batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"], warmup_steps=settings["warmup_steps"], seed=settings["seed"],
        progress=progress)
    seconds = time.time() - t0
    path = os.path.join(out_dir, settings["file"])
    models.save_checkpoint(path, model.params)
    report[name] = {
        "config": model.config, "train": settings, "train_seconds": round(seconds, 1),
        "final_loss": float(np.mean(losses[-20:])),
        "train_accuracy": accuracy(model, world.pool_images[train_idx], world.pool_labels[train_idx]),
        "heldout_accuracy": accuracy(model, world.pool_images[heldout_idx], world.pool_labels[heldout_idx]),
        "chance": 1.0 / world.n_basic, "bytes": os.path.getsize(path), "sha256": _sha256(path),
        "parameters": int(sum(np.size(v) for v in jax.tree.leaves(model.params))),
    }
    print(f"{name}: train acc {report[name]['train_accuracy']:.3f}, held-out acc "
          f"{report[name]['heldout_accuracy']:.3f}, {seconds:.0f} s, {report[name]['bytes'] / 1e6:.2f} MB -> {path}")
  with open(report_path, "w") as f:
    f.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
  return report


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=registry.CHECKPOINT_DIR, help="output directory (default: %(default)s)")
  parser.add_argument("--only", choices=sorted(TRAIN), action="append", help="train only this model (repeatable)")
  args = parser.parse_args(argv)
  train_demo_models(args.out, which=args.only or ("teacher", "student"))


if __name__ == "__main__":
  main()
