"""Stage `align`: fit the uncertainty-distillation transform of teacher features to human (soft) triplet labels.

Inputs: teacher features of the THINGS(-like) objects, in object order (an embed artifact's split, default
`things`, or an `.npy` (n_objects, p) matrix), and the human side: a `human` artifact (its triplets and soft labels
p*) or triplet files (`train`, `test`; hard labels only). Outputs: `transform.npz` (weights, bias, mean, std:
gLocal's layout), `cv.json` and `cv.png` (the lambda curve), and the report: held-out odd-one-out accuracy, NLL
(and KL to p* when soft labels are given) before (raw features) and after the transform. With soft labels,
`compare` also fits the other loss with its own cross-validation and reports both (`comparison`: accuracy, NLL, KL to
p*, lambda; and p* itself), and `label_temperature` fits to a sharpened or flattened p* (the KL stays to p*): the
README's soft-vs-hard table and its experiment.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, numeric_files, triplet_math
from alignet_data.checks import require_finite
from alignet_data.human import things
from alignet_data.teacher import alignment, object_features
from pipelines import stages

STAGE = "align"
__all__ = ["STAGE", "default_config", "add_arguments", "config_from_args", "input_urls", "run", "load_features"]


def default_config() -> dict[str, Any]:
  """gLocal's lambda grid (1e3..1e-5), 3 object folds, Adam 1e-3 with clipping 1.0; full-batch steps with early
  stopping (patience 20) instead of gLocal's minibatch epochs: the same objective, minutes instead of hours on CPU."""
  return {
      "features": None,          # Embed artifact URL, or an .npy (n_objects, p) file in object order.
      "features_split": "things",
      "unique_ids": None,        # With an embed artifact: THINGS unique_id.txt -> rows by uniqueID (file names) ...
      "object_reduce": "first",  # ... from each object's first image (THINGS' _01b) or the mean of its images.
      "human": None,             # Human artifact URL (triplets + soft labels) ...
      "train": None,             # ... or triplet files (hard labels only).
      "test": None,
      "loss": "soft",            # soft | hard
      "target": "identity",      # identity | scaled_identity
      "lambdas": list(alignment.DEFAULT_LAMBDAS),
      "folds": 3,
      "select_by": "loss",
      "lr": 1e-3,
      "batch_size": 0,           # <= 0: full-batch Adam (fast on CPU: the cost is the objects' Gram matrix).
      "max_epochs": 500,
      "min_epochs": 5,
      "patience": 20,
      "clip_norm": 1.0,
      "val_fraction": 0.1,
      "init_scale": 1e-3,
      "use_bias": True,
      "regularise_bias": False,
      "seed": 0,
      # Soft labels used for fitting: p* sharpened (< 1) or flattened (> 1) as p^(1/T), renormalised; the report's
      # KL is always to the unmodified p*. A probe of why soft loses accuracy (README, "soft vs hard").
      "label_temperature": 1.0,
      "compare": False,          # With soft labels: also fit the other loss (own CV) and report both side by side.
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--features", help="Embed artifact URL or .npy (n_objects, p) of teacher features.")
  parser.add_argument("--features-split", help="Split of the embed artifact holding the THINGS objects.")
  parser.add_argument("--unique-ids", help="THINGS unique_id.txt: read the embed artifact by uniqueID (its file "
                      "names) in this order, instead of by id.")
  parser.add_argument("--object-reduce", choices=object_features.REDUCTIONS,
                      help="With --unique-ids: an object's first image (by file name) or the mean of its images.")
  parser.add_argument("--human", help="Human artifact URL (triplets and soft labels p*).")
  parser.add_argument("--train", help="Training triplet file (instead of --human; hard labels).")
  parser.add_argument("--test", help="Test triplet file (instead of --human).")
  parser.add_argument("--loss", choices=alignment.LOSSES, help="soft: cross-entropy vs p*; hard: NLL of the choice.")
  parser.add_argument("--target", choices=alignment.TARGETS, help="Regulariser target T in ||W - T||^2.")
  parser.add_argument("--lambdas", type=float, nargs="+", help="Regularisation strengths to cross-validate.")
  parser.add_argument("--folds", type=int, help="Object folds for cross-validation.")
  parser.add_argument("--select-by", choices=("loss", "accuracy"), help="CV criterion for lambda.")
  parser.add_argument("--lr", type=float, help="Adam learning rate.")
  parser.add_argument("--batch-size", type=int, help="Triplets per Adam step (0: full batch, the default).")
  parser.add_argument("--max-epochs", type=int, help="Maximum epochs per fit.")
  parser.add_argument("--min-epochs", type=int, help="No early stop before this many epochs.")
  parser.add_argument("--patience", type=int, help="Early-stopping patience in epochs.")
  parser.add_argument("--val-fraction", type=float, help="Share of training triplets held out for early stopping.")
  parser.add_argument("--seed", type=int, help="Seed of folds, splits and batches.")
  parser.add_argument("--label-temperature", type=float,
                      help="Fit to p* ** (1 / T), renormalised (T < 1 sharpens); the KL reported is to p* itself.")
  parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                      help="With soft labels: also fit the other loss (hard/soft), each with its CV, and report both.")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = stages.apply_flags(default_config(), args)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  return {name: config[name] for name in ("features", "unique_ids", "human", "train", "test") if config.get(name)}


def load_features(url: str, split: str = "things", unique_ids: str | None = None,
                  reduce: str = "first") -> np.ndarray:
  """(n_objects, p) float32 features in object order: an .npy file, or an embed artifact split read by id (row i
  = id i) or, given a uniqueID list (THINGS unique_id.txt), by the uniqueID its file names carry."""
  if numeric_files.is_array_file(url):
    if unique_ids:
      raise ValueError(f"{url}: a matrix file is already in object order; --unique-ids applies to embed artifacts "
                       "only.")
    x = numeric_files.read_matrix(url, npz_keys=("features",), what="(n_objects, dim) feature matrix")
  else:
    from alignet_data.teacher import embeddings
    art = artifacts.load(url, stage="embed")
    emb = embeddings.load(art, split)
    if len(emb) == 0:
      raise ValueError(f"{url}: split {split!r} has no embeddings.")
    if unique_ids:
      x = object_features.features_by_unique_id(emb.file_names, emb.vectors,
                                                object_features.read_unique_ids(unique_ids), reduce)
    else:
      n = int(embeddings.info(art)["splits"][split].get("num_ids", int(emb.ids.max()) + 1))
      x = emb.take(np.arange(n))  # KeyError names any object whose image failed to embed.
  return require_finite(np.asarray(x, np.float32), f"Features {url}")


def _human_side(config: dict[str, Any], n_objects: int) -> dict[str, np.ndarray | None]:
  if config.get("human"):
    if config.get("train") or config.get("test"):
      raise ValueError("Give either `human` (a human artifact) or `train`/`test` triplet files, not both.")
    return things.read_soft_labels(config["human"], n_objects)
  if not (config.get("train") and config.get("test")):
    raise ValueError("The align stage needs `human` (a human artifact URL) or both `train` and `test` triplet "
                     "files (--train FILE --test FILE).")
  train = things.load_triplets(config["train"], n_objects)
  test = things.load_triplets(config["test"], n_objects)
  train, dropped = things.drop_overlap(train, test)
  return {"train_triplets": train, "train_probs": None, "test_triplets": test, "test_probs": None,
          "dropped_overlap": dropped}


def _align_config(config: dict[str, Any]) -> alignment.AlignConfig:
  keys = ("loss", "target", "folds", "select_by", "lr", "batch_size", "max_epochs", "min_epochs", "patience",
          "clip_norm", "val_fraction", "init_scale", "use_bias", "regularise_bias", "seed")
  return alignment.AlignConfig(lambdas=tuple(float(v) for v in config["lambdas"]), **{k: config[k] for k in keys})


def _plot_cv(cv: list[dict[str, Any]], chosen: float, loss: str, f: Any) -> None:
  """Mean held-out accuracy (and each fold's, faint) and loss per lambda; the chosen lambda dashed."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  lams = [r["lambda"] for r in cv]
  fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
  for r in cv:
    folds = r.get("folds", [])
    ax.plot([r["lambda"]] * len(folds), [x["accuracy"] for x in folds], ".", color="C0", alpha=0.35)
  ax.plot(lams, [r["accuracy"] for r in cv], "o-", color="C0")
  ax.set_xscale("log")
  ax.set_xlabel("lambda")
  ax.set_ylabel("held-out accuracy", color="C0")
  ax.axvline(chosen, color="grey", ls="--", lw=1)
  ax2 = ax.twinx()
  ax2.plot(lams, [r["loss"] for r in cv], "s-", color="C1")
  ax2.set_ylabel(f"held-out {loss} loss", color="C1")
  ax.set_title(f"align ({loss} loss): object-fold CV, lambda = {chosen:g}")
  fig.tight_layout()
  fig.savefig(f, format="png", metadata={"Software": None})  # No version string: same curve, same bytes.
  plt.close(fig)


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  if not config.get("features"):
    raise ValueError("The align stage needs `features`: an embed artifact URL or an .npy of teacher features.")
  features = load_features(config["features"], config["features_split"], config.get("unique_ids"),
                           config.get("object_reduce", "first"))
  human = _human_side(config, features.shape[0])
  cfg = _align_config(config)
  if cfg.loss == "soft" and human["train_probs"] is None:
    raise ValueError("loss 'soft' needs soft labels p*: pass --human HUMAN_ARTIFACT, or use --loss hard.")
  train, test = human["train_triplets"], human["test_triplets"]

  fit_probs = sharpen(human["train_probs"], config.get("label_temperature", 1.0))
  t, info = _fit(features, train, fit_probs, cfg)
  t.save(writer)

  before = alignment.evaluate(features, test, human["test_probs"])
  after = alignment.evaluate(t.apply(features), test, human["test_probs"])
  cv = [{k: r[k] for k in ("lambda", "loss", "accuracy")} for r in info["cv"]]
  writer.write_json("cv.json", info["cv"])
  if len(cv) > 1:
    with writer.open("cv.png", "wb") as f:
      _plot_cv(info["cv"], info["lambda"], cfg.loss, f)
  report: dict[str, Any] = {
      "accuracy_before": before["accuracy"],
      "accuracy_after": after["accuracy"],
      "nll_before": before["nll"],
      "nll_after": after["nll"],
      "lambda": info["lambda"],
      "loss": cfg.loss,
      "target": cfg.target,
      "cv": cv,
      "n_objects": int(features.shape[0]),
      "dim": int(features.shape[1]),
      "train_triplets": len(train),
      "test_triplets": len(test),
      "final_epochs": info["final"]["epochs"],
  }
  if "dropped_overlap" in human:
    report["dropped_overlap"] = human["dropped_overlap"]
  if human["test_probs"] is not None:
    report["kl_before"] = before["kl"]
    report["kl_after"] = after["kl"]
    report["label_temperature"] = config.get("label_temperature", 1.0)
    if config.get("compare"):
      other = dataclasses.replace(cfg, loss="hard" if cfg.loss == "soft" else "soft")
      t2, info2 = _fit(features, train, fit_probs, other)
      rows = {cfg.loss: (after, info), other.loss: (alignment.evaluate(t2.apply(features), test, human["test_probs"]),
                                                    info2)}
      report["comparison"] = {loss: {"accuracy": ev["accuracy"], "nll": ev["nll"], "kl": ev["kl"],
                                     "lambda": inf["lambda"]} for loss, (ev, inf) in sorted(rows.items())}
      report["comparison"]["p_star"] = {"accuracy": triplet_math.odd_one_out_accuracy(human["test_probs"]),
                                        "nll": triplet_math.human_pair_nll(human["test_probs"]), "kl": 0.0}
  return report


def sharpen(probs: np.ndarray | None, temperature: float) -> np.ndarray | None:
  """p ** (1 / T), renormalised per row (T = 1: p unchanged; T < 1 sharper, T > 1 flatter)."""
  if probs is None or temperature == 1.0:
    return probs
  if not temperature > 0:
    raise ValueError(f"label_temperature must be > 0, got {temperature}.")
  logp = np.log(np.maximum(np.asarray(probs, np.float64), 1e-30)) / temperature
  p = np.exp(logp - logp.max(1, keepdims=True))
  return (p / p.sum(1, keepdims=True)).astype(np.float32)


def _fit(features: np.ndarray, train: np.ndarray, probs: np.ndarray | None,
         cfg: alignment.AlignConfig) -> tuple[Any, dict[str, Any]]:
  """alignment.align with a progress bar (one tick per CV fit and for the final fit)."""
  from tqdm import tqdm

  n_fits = (len(cfg.lambdas) * cfg.folds if len(cfg.lambdas) > 1 else 0) + 1
  bar = tqdm(total=n_fits, desc=f"align/{cfg.loss}", unit="fit", leave=False)

  def on_fit(r: dict[str, Any]) -> None:
    post = {"lambda": f"{r['lambda']:g}", "fold": r["fold"], "epochs": r["epochs"]}
    if "accuracy" in r:
      post["acc"] = f"{r['accuracy']:.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)

  try:
    return alignment.align(features, train, probs, cfg, on_fit)
  finally:
    bar.close()
