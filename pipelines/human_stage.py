"""Stage `human`: fit VICE to human odd-one-out choices and write the soft labels p* the align stage distils.

Inputs: a demo world artifact (`world`, its THINGS-like `things_train`/`things_test`), or triplet files
(`train`, `test`; THINGS convention, see `alignet_data.things`). Outputs: `vice.npz` (loc, scale: the pruned,
sorted posterior; kept: their indices in the initial dimensions), `soft_labels.npz` (train/test triplets as
stored and their posterior predictive p* in the pair order [s01, s02, s12]), `history.json` (per epoch) and the
report (test accuracy and NLL of p* against the human choices).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, things, vice

STAGE = "human"
__all__ = ["STAGE", "default_config", "add_arguments", "config_from_args", "input_urls", "run"]

MODELS = ("vice",)


def default_config() -> dict[str, Any]:
  """Defaults fit the demo world (80 objects, 20k triplets: ~8 s of CPU). For the 1,854 THINGS objects use
  more epochs (VICE trains up to 2,000 with burn-in 500 and ws 200; see issue 3)."""
  return {
      "world": None,          # URL of a `world` artifact (uses things_train / things_test) ...
      "train": None,          # ... or triplet files (.npy or text, N x 3 or N x 4 with subject ids).
      "test": None,
      "n_objects": None,      # With files: number of objects (None: max index + 1 over both files).
      "model": "vice",
      "dims": 100,
      "epochs": 25,
      "batch_size": 128,
      "lr": 1e-3,
      "mc_samples": 50,       # R: posterior samples averaged (as probabilities) into p*.
      "pi": 0.5,
      "spike": 0.25,
      "slab": 1.0,
      "alpha": 0.05,
      "k": 5,
      "burnin": 500,
      "ws": 200,
      "prune": "converged",   # converged | always | never (see vice.ViceConfig.prune).
      "val_fraction": 0.0,    # > 0: hold out this share of training triplets (by object set) to monitor val NLL.
      "keep_best": False,     # With val_fraction > 0: keep the epoch with the best val NLL.
      "seed": 0,
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--world", help="World artifact URL (demo THINGS-like triplets).")
  parser.add_argument("--train", help="Training triplet file (.npy or text; i j odd [subject]; 0-based).")
  parser.add_argument("--test", help="Test triplet file (same format).")
  parser.add_argument("--n-objects", type=int, help="Number of objects (default: inferred from the files).")
  parser.add_argument("--model", choices=MODELS, help="Human model.")
  parser.add_argument("--dims", type=int, help="Initial VICE dimensionality.")
  parser.add_argument("--epochs", type=int, help="Maximum training epochs.")
  parser.add_argument("--batch-size", type=int, help="Triplets per step.")
  parser.add_argument("--lr", type=float, help="Adam learning rate.")
  parser.add_argument("--mc-samples", type=int, help="Posterior samples R for p*.")
  parser.add_argument("--burnin", type=int, help="Epochs before the convergence check.")
  parser.add_argument("--ws", type=int, help="Window of stable dimensionality that counts as converged.")
  parser.add_argument("--prune", choices=vice.PRUNE_MODES, help="When to drop dimensions that fail the BH test.")
  parser.add_argument("--val-fraction", type=float, help="Share of training triplets held out for validation.")
  parser.add_argument("--keep-best", action="store_true", default=None, help="Keep the best-validation epoch.")
  parser.add_argument("--seed", type=int, help="Seed of initialisation, batches and posterior samples.")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = default_config()
  for key in config:
    value = getattr(args, key, None)
    if value is not None:
      config[key] = value
  return config


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  if config.get("world"):
    return {"world": config["world"]}
  return {name: config[name] for name in ("train", "test") if config.get(name)}


def load_triplets(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int, Any]:
  """(train, test, n_objects, world or None) from the configured source."""
  if config.get("world"):
    if config.get("train") or config.get("test"):
      raise ValueError("Give either `world` or `train`/`test` triplet files, not both.")
    from alignet_data import demo_world
    world = demo_world.load(config["world"])
    n = len(world.concept_ids)
    train = things.validate_triplets(world.things_train, n, "world things_train")
    test = things.validate_triplets(world.things_test, n, "world things_test")
    return train, test, n, world
  if not (config.get("train") and config.get("test")):
    raise ValueError("The human stage needs `world` (a world artifact URL) or both `train` and `test` triplet "
                     "files (--train FILE --test FILE).")
  n = config.get("n_objects")
  train = things.load_triplets(config["train"], n)
  test = things.load_triplets(config["test"], n)
  if n is None:
    n = int(max(train.max(), test.max())) + 1
  return train, test, n, None


def _vice_config(config: dict[str, Any]) -> vice.ViceConfig:
  keys = ("dims", "epochs", "batch_size", "lr", "pi", "spike", "slab", "alpha", "k", "burnin", "ws", "prune",
          "keep_best", "seed")
  return vice.ViceConfig(**{k: config[k] for k in keys})


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  from tqdm import tqdm

  if config["model"] not in MODELS:
    raise ValueError(f"Unknown human model {config['model']!r}; available: {MODELS}.")
  train, test, n_objects, world = load_triplets(config)
  train, dropped = things.drop_overlap(train, test)
  if len(train) == 0:
    raise ValueError("Every training triplet also occurs in the test set: nothing left to train on.")
  fit_rows, val_rows = np.arange(len(train)), None
  if config["val_fraction"] and config["val_fraction"] > 0:
    fit_rows, val_rows = things.split_train_test(train, config["val_fraction"], config["seed"])
  cfg = _vice_config(config)

  bar = tqdm(total=cfg.epochs, desc="human/vice", unit="epoch", leave=False)

  def on_epoch(r: dict[str, Any]) -> None:
    post = {"loss": f"{r['loss']:.3f}", "acc": f"{r['accuracy']:.3f}", "dims": r["dims"]}
    if "val_accuracy" in r:
      post["val_acc"] = f"{r['val_accuracy']:.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)

  try:
    result = vice.fit(train[fit_rows], n_objects, cfg, on_epoch,
                      val_triplets=None if val_rows is None else train[val_rows])
  finally:
    bar.close()

  train_probs = vice.posterior_predictive(result.loc, result.scale, train, config["mc_samples"], config["seed"])
  test_probs = vice.posterior_predictive(result.loc, result.scale, test, config["mc_samples"], config["seed"])
  writer.write_npz("vice.npz", loc=result.loc, scale=result.scale, kept=result.kept.astype(np.int64))
  writer.write_npz("soft_labels.npz", train_triplets=train, train_probs=train_probs, test_triplets=test,
                   test_probs=test_probs)
  writer.write_json("history.json", result.history)
  writer.set_rows("train_triplets", len(train))
  writer.set_rows("test_triplets", len(test))

  report: dict[str, Any] = {
      "model": config["model"],
      "n_objects": n_objects,
      "train_triplets": len(train),
      "test_triplets": len(test),
      "dropped_overlap": dropped,
      "test_accuracy": vice.accuracy(test_probs),
      "test_nll": vice.nll(test_probs),
      "train_accuracy": vice.accuracy(train_probs),
      "dims_kept": int(result.loc.shape[1]),
      "dims_significant": result.dims_significant,
      "epochs": result.epochs,
      "converged": result.converged,
  }
  if val_rows is not None:
    report["val_triplets"] = len(val_rows)
    report["val_accuracy"] = vice.accuracy(train_probs[val_rows])
    report["val_nll"] = vice.nll(train_probs[val_rows])
  if result.best_epoch is not None:
    report["best_epoch"] = result.best_epoch
  if world is not None:
    # The simulation's own choice probabilities: the ceiling any model of these humans can reach.
    from alignet_data import triplet_math
    true_p = np.asarray(world.things_test_probs, np.float64)
    report["simulation_test_accuracy"] = vice.accuracy(true_p)
    report["simulation_test_nll"] = vice.nll(true_p)
    report["test_kl_to_simulation"] = float(triplet_math.kl_divergence(true_p, test_probs).mean())
  return report
