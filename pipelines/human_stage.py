"""Stage `human`: fit a model of human odd-one-out choices and write the soft labels p* the align stage distils.

Inputs: a demo world artifact (`world`, its THINGS-like `things_train`/`things_test`), or triplet files
(`train`, `test`; THINGS convention, see `alignet_data.human.things`; `sortindex` + `upload_order` convert files in the
original upload order). Every training triplet whose object set occurs in the test set is dropped first.
Models: `vice` (default; the Bayesian model whose posterior predictive gives p*), `spose` (its non-Bayesian
baseline, trained by the same loop), or a fixed `embedding` (e.g. the published SPoSE) with a fitted softmax
temperature. VICE trains `seeds` restarts until its convergence rule fires (BH-pruned dimensionality stable for `ws`
epochs after `burnin`), prunes to the selected dimensions, refines them, and keeps the restart with the best
validation NLL. Outputs: `vice.npz` (loc, scale: the kept restart's pruned, sorted posterior; kept: their indices in
the initial dimensions) or `embedding.npz` (the embedding and beta), `soft_labels.npz` (train/test triplets as
stored and their p* in the pair order [s01, s02, s12], from the kept restart), `history.json` (per restart, per
epoch), `reliability.png` (calibration of p* on the test triplets) and the report: test accuracy and NLL of p*,
convergence, dimensions kept, every restart's figures, test accuracy by number of leading dimensions, calibration
(ECE, reliability bins, KL to the answer distribution of test triplets answered by several people), the settings.

Real data (issues 3, 16): `alignet human --train ../shared/data/things/triplets_127k_subjects.txt
--test ../shared/data/things/triplets_50k.txt --out DIR` (add `--model spose`, or `--embedding spose49.npy`).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, triplet_math
from alignet_data.human import calibration, spose, things, vice
from pipelines import stages

STAGE = "human"
__all__ = ["STAGE", "default_config", "add_arguments", "config_from_args", "input_urls", "run"]

MODELS = ("vice", "spose")

# Training settings left at None in the config are filled from a profile chosen by data size (`profile`, default:
# `demo` for a world artifact, `files` for triplet files). VICE's own settings (batch 128, lr 1e-3, burn-in 500,
# window 200 epochs) were set for 1.46M THINGS triplets, where an epoch is ~11k steps; on 20k (demo) or 125k
# (the THINGS files) triplets those epoch counts are 10-100x more optimisation, and with the old caps (25 and 150
# epochs) the rule never fired. The profiles below therefore count burn-in and window in epochs of their own data
# size, take a larger step until burn-in, and anneal it over the first window (ViceConfig.lr_final) so that the
# BH-pruned dimensionality settles and the convergence rule fires; the kept model is the restart (of `seeds`) with
# the best validation NLL. Measured figures are in the README ("Human stage").
# `full` is for the complete THINGS set (4.1M triplets, ~4,000 steps an epoch at batch 1024): the same number of
# steps before and within the window as `files` in far fewer epochs (not run here: the full set is not available).
# SPoSE (same loop, no prior) overfits 125k triplets within ~10 epochs, so it is scored every epoch and keeps its
# best one (its only regulariser besides L1); it has no convergence rule to speak of (burn-in beyond its epochs).
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {
        "vice": {"dims": 100, "epochs": 200, "batch_size": 256, "lr": 8e-3, "val_fraction": 0.05, "keep_best": False,
                 "patience": 0, "eval_every": 10, "burnin": 30, "ws": 15, "lr_final": 0.1, "refine": 10, "seeds": 2},
        "spose": {"dims": 100, "epochs": 25, "batch_size": 128, "lr": 1e-3, "val_fraction": 0.1, "keep_best": True,
                  "patience": 0, "eval_every": 1, "burnin": 1000, "ws": 200, "lr_final": 1.0, "refine": 0, "seeds": 1},
    },
    "files": {
        "vice": {"dims": 100, "epochs": 400, "batch_size": 1024, "lr": 8e-3, "val_fraction": 0.05,
                 "keep_best": False, "patience": 0, "eval_every": 10, "burnin": 50, "ws": 50, "lr_final": 0.1,
                 "refine": 40, "seeds": 3},
        "spose": {"dims": 100, "epochs": 100, "batch_size": 1024, "lr": 8e-3, "val_fraction": 0.05,
                  "keep_best": True, "patience": 5, "eval_every": 1, "burnin": 1000, "ws": 200, "lr_final": 1.0,
                  "refine": 0, "seeds": 1},
    },
    "full": {
        "vice": {"dims": 100, "epochs": 100, "batch_size": 1024, "lr": 8e-3, "val_fraction": 0.01,
                 "keep_best": False, "patience": 0, "eval_every": 2, "burnin": 3, "ws": 3, "lr_final": 0.1,
                 "refine": 2, "seeds": 3},
        "spose": {"dims": 100, "epochs": 30, "batch_size": 1024, "lr": 8e-3, "val_fraction": 0.01,
                  "keep_best": True, "patience": 3, "eval_every": 1, "burnin": 1000, "ws": 200, "lr_final": 1.0,
                  "refine": 0, "seeds": 1},
    },
}
_PROFILE_KEYS = ("dims", "epochs", "batch_size", "lr", "val_fraction", "keep_best", "patience", "eval_every",
                 "burnin", "ws", "lr_final", "refine", "seeds")
UPLOAD_ORDER_NAMES = ("train", "test", "embedding")


def default_config() -> dict[str, Any]:
  """Every field; training settings at None take the profile's value (PROFILES: `demo` for a world, `files` for
  triplet files), so the real-data command needs no tuning flags and the demo chain stays fast."""
  return {
      "world": None,          # URL of a `world` artifact (uses things_train / things_test) ...
      "train": None,          # ... or triplet files (.npy or text, N x 3 or N x 4 with subject ids).
      "test": None,
      "n_objects": None,      # With files: number of objects (None: max index + 1 over both files).
      "sortindex": None,      # THINGS sortindex file, for inputs in the original upload order (see upload_order).
      "upload_order": [],     # Which of train, test, embedding are in upload order (converted with sortindex).
      "model": "vice",        # vice | spose: the model trained on the training triplets ...
      "embedding": None,      # ... or a fixed (n_objects, d) human embedding with a fitted softmax temperature.
      "profile": None,        # demo | files | full: training defaults by data size (None: demo for a world, or files).
      "dims": None,           # Initial dimensionality.
      "epochs": None,         # Maximum epochs.
      "batch_size": None,
      "lr": None,             # Adam learning rate.
      "val_fraction": None,   # Share of training triplets held out (by object set) to monitor the val NLL.
      "keep_best": None,      # With a validation split: keep the epoch with the best val NLL.
      "patience": None,       # With a validation split: stop after this many scorings without improvement (0: off).
      "eval_every": None,     # Score the validation split every this many epochs.
      "burnin": None,         # No convergence check before this epoch.
      "ws": None,             # Converged when the pruned dimensionality is unchanged for ws epochs after burn-in.
      "lr_final": None,       # lr decays to lr * lr_final over the ws epochs after burn-in (1: constant).
      "refine": None,         # Epochs training only the kept dimensions after convergence (vice.ViceConfig.refine).
      "seeds": None,          # Restarts (seeds seed, seed + 1, ...); the best validation NLL is kept.
      "mc_samples": 50,       # R: posterior samples averaged (as probabilities) into p*.
      "pi": 0.5,
      "spike": 0.25,
      "slab": 1.0,
      "alpha": 0.05,
      "k": 5,
      "prune": "converged",   # converged | always | never (see vice.ViceConfig.prune).
      "lmbda": 0.008,         # SPoSE's L1 weight (per object).
      "seed": 0,
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--world", help="World artifact URL (demo THINGS-like triplets).")
  parser.add_argument("--train", help="Training triplet file (.npy or text; i j odd [subject]; 0-based).")
  parser.add_argument("--test", help="Test triplet file (same format).")
  parser.add_argument("--n-objects", type=int, help="Number of objects (default: inferred from the files).")
  parser.add_argument("--sortindex", help="THINGS sortindex file, to convert inputs given in upload order.")
  parser.add_argument("--upload-order", type=lambda v: [x for x in v.split(",") if x],
                      help=f"Comma-separated inputs in upload order, of {','.join(UPLOAD_ORDER_NAMES)}.")
  parser.add_argument("--model", choices=MODELS, help="Human model to train (default vice).")
  parser.add_argument("--embedding", help="Fixed human embedding (.npy or text, n_objects x d) instead of training.")
  parser.add_argument("--dims", type=int, help="Initial dimensionality.")
  parser.add_argument("--epochs", type=int, help="Maximum training epochs.")
  parser.add_argument("--batch-size", type=int, help="Triplets per step.")
  parser.add_argument("--lr", type=float, help="Adam learning rate.")
  parser.add_argument("--mc-samples", type=int, help="Posterior samples R for p*.")
  parser.add_argument("--profile", choices=tuple(PROFILES), help="Training defaults by data size (default: demo "
                      "for a world, files for triplet files; full: the complete 4.1M THINGS set).")
  parser.add_argument("--seeds", type=int, help="Restarts from consecutive seeds; the best validation NLL is kept.")
  parser.add_argument("--lr-final", type=float, help="lr decays to lr * this over the window after burn-in.")
  parser.add_argument("--refine", type=int, help="Epochs on the kept dimensions after convergence and pruning.")
  parser.add_argument("--burnin", type=int, help="Epochs before the convergence check.")
  parser.add_argument("--ws", type=int, help="Window of stable dimensionality that counts as converged.")
  parser.add_argument("--prune", choices=vice.PRUNE_MODES, help="When to drop dimensions that fail the BH test.")
  parser.add_argument("--val-fraction", type=float, help="Share of training triplets held out for validation.")
  parser.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=None,
                      help="Keep the best-validation epoch.")
  parser.add_argument("--patience", type=int, help="Stop after this many validation scorings without improvement.")
  parser.add_argument("--eval-every", type=int, help="Score the validation split every this many epochs.")
  parser.add_argument("--lmbda", type=float, help="SPoSE L1 weight.")
  parser.add_argument("--seed", type=int, help="Seed of initialisation, batches and posterior samples.")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  return stages.apply_flags(default_config(), args)


def settings(config: dict[str, Any]) -> dict[str, Any]:
  """The training settings in effect: the config's, with None filled from the profile of the input kind."""
  name = config.get("profile") or ("demo" if config.get("world") else "files")
  if name not in PROFILES:
    raise ValueError(f"Unknown human profile {name!r}; profiles are: {', '.join(PROFILES)}.")
  profile = PROFILES[name][config["model"]]
  return {k: profile[k] if config.get(k) is None else config[k] for k in _PROFILE_KEYS}


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  names = ("world",) if config.get("world") else ("train", "test")
  return {name: config[name] for name in (*names, "embedding", "sortindex") if config.get(name)}


def _check_upload_order(config: dict[str, Any]) -> list[str]:
  order = list(config.get("upload_order") or [])
  unknown = sorted(set(order) - set(UPLOAD_ORDER_NAMES))
  if unknown:
    raise ValueError(f"upload_order names {unknown}; it lists some of {', '.join(UPLOAD_ORDER_NAMES)}.")
  if order and not config.get("sortindex"):
    raise ValueError(f"upload_order {order} needs the THINGS sortindex file: pass --sortindex FILE.")
  return order


def load_triplets(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int, Any]:
  """(train, test, n_objects, world or None) from the configured source, in canonical object order."""
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
  order = _check_upload_order(config)
  n = config.get("n_objects")
  train = things.load_triplets(config["train"], n)
  test = things.load_triplets(config["test"], n)
  if n is None:
    n = int(max(train.max(), test.max())) + 1
  if order:
    sortindex = things.load_sortindex(config["sortindex"])
    if n > len(sortindex):
      raise ValueError(f"Triplets index {n} objects but the sortindex has {len(sortindex)} entries.")
    n = len(sortindex)
    train = things.upload_to_canonical(train, sortindex) if "train" in order else train
    test = things.upload_to_canonical(test, sortindex) if "test" in order else test
  return train, test, n, None


def _load_embedding(config: dict[str, Any], n_objects: int) -> np.ndarray:
  emb = spose.load_embedding(config["embedding"])
  if "embedding" in _check_upload_order(config):
    emb = things.embedding_to_canonical(emb, things.load_sortindex(config["sortindex"]))
  if len(emb) < n_objects or (config.get("n_objects") and len(emb) != config["n_objects"]):
    raise ValueError(f"{config['embedding']}: has {len(emb)} rows but the triplets index "
                     f"{config.get('n_objects') or n_objects} objects; give one row per object.")
  return emb


def _vice_config(config: dict[str, Any], run_settings: dict[str, Any]) -> vice.ViceConfig:
  keys = ("pi", "spike", "slab", "alpha", "k", "prune", "lmbda", "seed", "model")
  fit_keys = ("dims", "epochs", "batch_size", "lr", "keep_best", "patience", "eval_every", "burnin", "ws", "lr_final",
              "refine")
  return vice.ViceConfig(**{k: config[k] for k in keys}, **{k: run_settings[k] for k in fit_keys})


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  from tqdm import tqdm

  if config["model"] not in MODELS:
    raise ValueError(f"Unknown human model {config['model']!r}; available: {MODELS}.")
  start = time.perf_counter()
  train, test, n_objects, world = load_triplets(config)
  train, dropped = things.drop_overlap(train, test)
  if len(train) == 0:
    raise ValueError("Every training triplet also occurs in the test set: nothing left to train on.")
  report: dict[str, Any] = {"n_objects": n_objects, "train_triplets": len(train), "test_triplets": len(test),
                            "dropped_overlap": dropped}
  if config.get("embedding"):
    # A fixed embedding: only the softmax temperature is fitted (on all training triplets).
    emb = _load_embedding(config, n_objects)
    n_objects = len(emb)
    beta = spose.fit_temperature(emb, train)
    train_probs, test_probs = spose.predict(emb, train, beta), spose.predict(emb, test, beta)
    writer.write_npz("embedding.npz", embedding=emb.astype(np.float32), beta=np.float64(beta))
    report.update(model="embedding", n_objects=n_objects, beta=beta, temperature=1.0 / beta,
                  dims_kept=int(emb.shape[1]), epochs=0)
  else:
    run_settings = settings(config)
    fit_rows, val_rows = np.arange(len(train)), None
    if run_settings["val_fraction"] and run_settings["val_fraction"] > 0:
      fit_rows, val_rows = things.split_train_test(train, run_settings["val_fraction"], config["seed"])
    cfg = _vice_config(config, run_settings)
    restarts = int(run_settings["seeds"])
    bar = tqdm(total=cfg.epochs * restarts, desc=f"human/{cfg.model}", unit="epoch", leave=False)

    def on_epoch(r: dict[str, Any]) -> None:
      post = {"seed": cfg.seed + r["restart"], "loss": f"{r['loss']:.3f}", "acc": f"{r['accuracy']:.3f}",
              "dims": r["dims"]}
      if "val_accuracy" in r:
        post["val_acc"] = f"{r['val_accuracy']:.3f}"
      bar.set_postfix(post, refresh=False)
      bar.update(1)

    try:
      result, restart_results = vice.fit_restarts(train[fit_rows], n_objects, cfg, restarts, on_epoch,
                                                  val_triplets=None if val_rows is None else train[val_rows])
    finally:
      bar.close()
    # p* and everything below come from the kept restart, with its own seed's posterior samples.
    samples = 1 if cfg.model == "spose" else config["mc_samples"]  # A point estimate: every sample is the same.
    train_probs = vice.posterior_predictive(result.loc, result.scale, train, samples, result.seed)
    test_probs = vice.posterior_predictive(result.loc, result.scale, test, samples, result.seed)
    writer.write_npz("vice.npz", loc=result.loc, scale=result.scale, kept=result.kept.astype(np.int64))
    writer.write_json("history.json", [{"seed": res.seed, "history": res.history} for res in restart_results])
    report.update(model=cfg.model, settings=run_settings, seed=result.seed, dims_initial=cfg.dims,
                  dims_kept=int(result.loc.shape[1]), dims_significant=result.dims_significant, epochs=result.epochs,
                  converged=result.converged, restarts=[res.summary() for res in restart_results])
    if val_rows is not None:
      report["fit_triplets"] = len(fit_rows)
      report["val_triplets"] = len(val_rows)
      report["val_accuracy"] = triplet_math.odd_one_out_accuracy(train_probs[val_rows])
      report["val_nll"] = triplet_math.human_pair_nll(train_probs[val_rows])
    if result.best_epoch is not None:
      report["best_epoch"] = result.best_epoch
    if cfg.model == "vice":
      report["accuracy_by_dims"] = vice.accuracy_by_dims(result.loc, result.scale, test, samples, result.seed)
  writer.write_npz("soft_labels.npz", train_triplets=train, train_probs=train_probs, test_triplets=test,
                   test_probs=test_probs)
  writer.set_rows("train_triplets", len(train))
  writer.set_rows("test_triplets", len(test))
  report.update(test_accuracy=triplet_math.odd_one_out_accuracy(test_probs),
                test_nll=triplet_math.human_pair_nll(test_probs),
                train_accuracy=triplet_math.odd_one_out_accuracy(train_probs))
  # How well p* tracks human uncertainty on the test triplets, not only its argmax (reliability.png: the diagram).
  cal = calibration.calibration_report(test, test_probs)
  with writer.open("reliability.png", "wb") as f:
    calibration.plot_reliability(cal, f, f"p* reliability, {len(test):,} test triplets")
  report["calibration"] = {k: v for k, v in cal.items() if k not in ("nll", "accuracy")}
  if world is not None:
    # The simulation's own choice probabilities: the ceiling any model of these humans can reach.
    true_p = np.asarray(world.things_test_probs, np.float64)
    report["simulation_test_accuracy"] = triplet_math.odd_one_out_accuracy(true_p)
    report["simulation_test_nll"] = triplet_math.human_pair_nll(true_p)
    report["test_kl_to_simulation"] = float(triplet_math.kl_divergence(true_p, test_probs).mean())
  report["seconds"] = round(time.perf_counter() - start, 1)
  return report
