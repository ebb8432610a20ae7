"""The `evaluate` stage: human-alignment metrics of one or more models on the demo world, with bootstrap CIs.

Each model embeds the Levels-like pool images and the THINGS-like concept images in-process (jitted, fixed-size
batches); `alignet_data.evaluation` turns the similarities into per-level odd-one-out accuracy against the
majority vote, the entropy-vs-log-RT Spearman per level and THINGS-like accuracy, each with its 95% CI and n.
Writes report.json (= the returned report), `report.md` and `levels_accuracy.png`.

Model specs (config["models"]: name -> spec):
  "demo-student", "<config-name>:<checkpoint.npz>"   anything `models.load_model` takes;
  "train:<train artifact URL>"                       the fine-tuned student of a train artifact (student.json);
  "train:{train}"                                    the same, with the URL from config["train"] (the chain's
                                                     link); such models are skipped while config["train"] is "";
  {"model": <one of the above>, "transform": <align artifact URL or transform .npz>}   with an affine transform.
Artifact and checkpoint URLs in specs are inputs of the stage (digested), so a new train run re-evaluates.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, evaluation, triplet_math

STAGE = "evaluate"
TRAIN_PREFIX = "train:"
PLOT = "levels_accuracy.png"


def default_config() -> dict[str, Any]:
  return {
      "world": "",   # demo world artifact URL
      "train": "",   # train artifact URL, referenced by specs as "train:{train}"
      "models": {"student_before": "demo-student", "student_after": "train:{train}"},  # name -> spec (module doc)
      "bootstrap": {"resamples": 100, "size": 1000},  # or an int: the number of resamples
      "seed": 0,
      "entropy_tau": 100.0,  # temperature of the model's 3-way softmax whose entropy is its uncertainty
      "max_rt": 10.0,        # responses slower than this (s) are excluded from the RT analysis (paper)
      "batch_size": 256,
      "plot": True,
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--world", default=None, help="demo world artifact URL")
  parser.add_argument("--train", default=None, help="train artifact URL (the fine-tuned student: train:{train})")
  parser.add_argument("--model", dest="models", action="append", default=None, metavar="NAME=SPEC",
                      help="a model to evaluate (repeatable): demo-student, <config>:<ckpt.npz>, train:<artifact>")
  parser.add_argument("--bootstrap-resamples", type=int, default=None)
  parser.add_argument("--bootstrap-size", type=int, default=None)
  parser.add_argument("--seed", type=int, default=None)
  parser.add_argument("--entropy-tau", type=float, default=None)
  parser.add_argument("--batch-size", type=int, default=None)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = default_config()
  for key in ("world", "train", "seed", "entropy_tau", "batch_size"):
    if getattr(args, key, None) is not None:
      config[key] = getattr(args, key)
  if getattr(args, "models", None):
    models = {}
    for item in args.models:
      name, sep, spec = item.partition("=")
      if not sep or not name or not spec:
        raise ValueError(f"--model {item!r}: expected NAME=SPEC, e.g. student_after=train:runs/demo/train")
      models[name] = spec
    config["models"] = models
  for key in ("resamples", "size"):
    value = getattr(args, f"bootstrap_{key}", None)
    if value is not None:
      config["bootstrap"] = {**_bootstrap(config), key: value}
  return config


def _bootstrap(config: dict[str, Any]) -> dict[str, int]:
  boot = config["bootstrap"]
  if isinstance(boot, int):
    return {"resamples": boot, "size": 1000}
  return {"resamples": int(boot.get("resamples", 100)), "size": int(boot.get("size", 1000))}


def model_specs(config: dict[str, Any]) -> dict[str, str | dict[str, Any]]:
  """The models to evaluate with "{train}" filled in; those that need an absent train artifact are left out."""
  out = {}
  for name, spec in config["models"].items():
    model, transform = _split_spec(spec)
    if "{train}" in model:
      if not config.get("train"):
        continue
      model = model.replace("{train}", config["train"])
    out[name] = {"model": model, "transform": transform} if transform else model
  return out


def _split_spec(spec: str | dict[str, Any]) -> tuple[str, str | None]:
  if isinstance(spec, dict):
    if "model" not in spec:
      raise ValueError(f"Model spec {spec!r} needs a 'model' key (and optionally 'transform').")
    return spec["model"], spec.get("transform")
  return spec, None


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  urls = {"world": config["world"]} if config["world"] else {}
  for name, spec in sorted(model_specs(config).items()):
    model, transform = _split_spec(spec)
    if model.startswith(TRAIN_PREFIX):
      urls[f"model_{name}"] = model[len(TRAIN_PREFIX):]
    elif ":" in model:
      urls[f"model_{name}"] = model.split(":", 1)[1]
    if transform:
      urls[f"transform_{name}"] = transform
  return urls


def load_model(spec: str) -> Any:
  """A LoadedModel from a spec string (see the module doc)."""
  if spec.startswith(TRAIN_PREFIX):
    from trainer import train
    return train.load_student(spec[len(TRAIN_PREFIX):])
  from alignet_data import models
  return models.load_model(spec)


@functools.lru_cache(maxsize=8)
def _jitted(embed_fn: Any) -> Any:
  import jax
  return jax.jit(embed_fn)


def embed_images(model: Any, images: np.ndarray, batch_size: int, bar: Any = None) -> np.ndarray:
  """uint8 images -> (n, dim) float32 representations; fixed-size batches so the model compiles once."""
  fn = _jitted(model.embed_fn)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(model.params, model.preprocess(chunk)))[:batch_size - pad])
    if bar is not None:
      bar.update(batch_size - pad)
  return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  del beam_args  # Not a Beam stage.
  from tqdm import tqdm

  from alignet_data import demo_world
  from alignet_data.transform import Transform

  if not config["world"]:
    raise ValueError("config['world'] is empty: give the demo world artifact URL (run `alignet world` first).")
  specs = model_specs(config)
  if not specs:
    raise ValueError("No model to evaluate: config['models'] is empty (or needs config['train']); name one, "
                     "e.g. {'student': 'demo-student'}.")
  world = demo_world.load(config["world"])
  boot_cfg = _bootstrap(config)
  boot = {"n_resamples": boot_cfg["resamples"], "size": boot_cfg["size"], "seed": int(config["seed"])}
  max_rt = float(config["max_rt"])

  # Only the pool images that Levels-like triplets use are embedded.
  pool_ids, levels_local = np.unique(world.levels_triplets, return_inverse=True)
  levels_local = levels_local.reshape(world.levels_triplets.shape)
  human = evaluation.levels_human(world.levels_choices, world.levels_level, world.levels_rt, max_rt=max_rt, **boot)

  levels: dict[str, Any] = {}
  things: dict[str, Any] = {}
  described: dict[str, Any] = {}
  total = len(specs) * (len(pool_ids) + len(world.things_images))
  with tqdm(total=total, desc="evaluate: embed", unit="img", dynamic_ncols=True) as bar:
    for name, spec in specs.items():
      model_spec, transform_url = _split_spec(spec)
      model = load_model(model_spec)
      transform = Transform.load(transform_url) if transform_url else None
      pool = embed_images(model, world.pool_images[pool_ids], int(config["batch_size"]), bar)
      things_x = embed_images(model, world.things_images, int(config["batch_size"]), bar)
      if transform is not None:
        pool, things_x = transform.apply(pool), transform.apply(things_x)
      levels[name] = evaluation.levels_model(
          triplet_math.triplet_similarities(pool, levels_local), world.levels_choices, world.levels_level,
          world.levels_rt, entropy_tau=float(config["entropy_tau"]), max_rt=max_rt, **boot)
      things[name] = evaluation.things_accuracy(triplet_math.triplet_similarities(things_x, world.things_test),
                                                **boot)
      described[name] = {"spec": spec, "config": model.config.get("name"), "dim": int(model.dim)}

  report = {
      # levels[model][level] = {accuracy, ci, n, n_no_majority, entropy_rt_spearman: {value, ci, n}}
      "levels": levels,
      "things": things,  # things[model] = {accuracy, ci, n} on the THINGS-like test triplets
      "human": human,    # human[level] = {noise_ceiling: {value, ci, n}, n_triplets, n_no_majority, mean_log_rt}
      "accuracy": {name: evaluation.flat_accuracies(r) for name, r in levels.items()},
      "noise_ceiling": {lv: row["noise_ceiling"]["value"] for lv, row in human.items()},
      "entropy_rt_spearman": {name: {lv: row["entropy_rt_spearman"]["value"] for lv, row in r.items()
                                     if "entropy_rt_spearman" in row} for name, r in levels.items()},
      "models": described,
      "bootstrap": {"resamples": boot["n_resamples"], "size": boot["size"], "seed": boot["seed"]},
      "majority_ties": "triplets whose responses have no unique majority are excluded from accuracy "
                       "(counted in n_no_majority)",
  }
  with writer.open("report.md", "wb") as f:
    f.write(markdown(report).encode())
  if config.get("plot", True):
    with writer.open(PLOT, "wb") as f:
      plot_levels(report, f)
  return report


def markdown(report: dict[str, Any]) -> str:
  """A one-page summary: per-level accuracy with 95% CIs per model, the noise ceiling, entropy-RT rho."""
  levels = [lv for lv in evaluation.LEVELS if lv in report["noise_ceiling"]]
  head = "| model | " + " | ".join(levels) + " | THINGS-like |"
  lines = ["# Evaluation", "", "Odd-one-out accuracy against the majority of 5 responses (95% bootstrap CI).", "",
           head, "|" + " --- |" * (len(levels) + 2)]
  for name, r in report["levels"].items():
    cells = [f"{r[lv]['accuracy']:.3f} [{r[lv]['ci'][0]:.3f}, {r[lv]['ci'][1]:.3f}]" for lv in levels]
    t = report["things"][name]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {t['accuracy']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] |")
  lines.append("| human noise ceiling (LOO) | " + " | ".join(f"{report['noise_ceiling'][lv]:.3f}" for lv in levels)
               + " | |")
  lines += ["", "Spearman rho of model entropy vs mean log RT:", "", "| model | " + " | ".join(levels) + " |",
            "|" + " --- |" * (len(levels) + 1)]
  for name, row in report["entropy_rt_spearman"].items():
    lines.append(f"| {name} | " + " | ".join(f"{row.get(lv, float('nan')):.3f}" for lv in levels) + " |")
  lines += ["", f"![per-level accuracy]({PLOT})", ""]
  return "\n".join(lines)


def plot_levels(report: dict[str, Any], fileobj: Any) -> None:
  """Grouped bars: per level, one bar per model with its 95% CI; the human noise ceiling as a dashed line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  levels = [lv for lv in evaluation.LEVELS if lv in report["noise_ceiling"]]
  names = list(report["levels"])
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  for i, name in enumerate(names):
    rows = report["levels"][name]
    acc = np.array([rows[lv]["accuracy"] for lv in levels])
    ci = np.array([rows[lv]["ci"] for lv in levels])
    x = np.arange(len(levels)) - 0.4 + width * (i + 0.5)
    ax.bar(x, acc, width, label=name, yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=3)
  for j, lv in enumerate(levels):
    ax.hlines(report["noise_ceiling"][lv], j - 0.45, j + 0.45, colors="k", linestyles="dashed",
              label="noise ceiling" if j == 0 else None)
  ax.axhline(1 / 3, color="grey", lw=0.8, ls=":")
  ax.set_xticks(np.arange(len(levels)), levels)
  ax.set_ylim(0, 1.15)
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.set_ylabel("odd-one-out accuracy (95% CI)")
  ax.legend(fontsize=8, loc="upper center", ncol=len(names) + 1, frameon=False)
  fig.tight_layout()
  fig.savefig(fileobj, format="png", metadata={"Software": None})
  plt.close(fig)

