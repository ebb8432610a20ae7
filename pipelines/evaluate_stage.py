"""The `evaluate` stage: human-alignment and downstream metrics of any model, each with its 95% CI and n.

Every interval names its method (`metrics.METHODS`; report.json's "bootstrap"."methods" describes those used):
by default a bootstrap over all n items, plus one over THINGS objects for THINGS triplets; config["bootstrap"]
protocol "paper" gives the paper's 100 resamples of 1,000 items instead, labelled bootstrap_subsample_1000.

What can be evaluated (config["models"]: name -> spec; the first model is the report's "primary" one):
  "demo-student", "<config-name>:<checkpoint.npz>"   anything `models.load_model` takes (embeds images: the
                                                     demo world's, or files in config["images"] found by base
                                                     name for released Levels / RSA stimuli);
  "train:<train artifact URL>"                       the fine-tuned student of a train artifact (student.json);
  "train:{train}"                                    the same, with the URL from config["train"] (the chain's
                                                     link); such models are skipped while config["train"] is "";
  "savedmodel:<dir>"                                 a released AligNet TF SavedModel (`evaluation.savedmodel`);
  "embeddings:<embed artifact URL>"                  precomputed vectors: split config["things_split"] for THINGS,
                                                     "pool" for the demo world's Levels, config["levels_split"]
                                                     for released Levels / RSA stimuli (matched by file name);
  "embeddings:<file.npy>"                            an (n, d) matrix whose row i is item i (THINGS concept i in
                                                     canonical order, e.g. ../shared/data/things/spose49.npy);
  {"model": <one of the above>, "transform": <align artifact URL or transform .npz>}   with an affine transform.

What is measured, when its data are configured (each part is skipped, with the reason in report["skipped"],
when a model cannot provide the vectors it needs):
  THINGS   odd-one-out accuracy (ties wrong) on config["things_triplets"] (else the demo world's test
           triplets), item and object bootstrap CIs (and Wald); with soft labels (config["things_soft_labels"], or
           the world's), the KL of human to model pair probabilities and their Pearson/Spearman correlation.
  Levels   per level: accuracy vs the 5-response majority (no-majority triplets excluded, counted), the human
           leave-one-out noise ceiling, Spearman of model entropy vs mean log RT (RT > max_rt dropped); from
           released Levels CSVs (config["levels"], `alignet_data.evaluation.levels`) or the demo world.
  RSA      config["rsa"]: [{"name", "matrix", "stimuli", "kind": "rsm"|"rdm"}]: Pearson-kernel and cosine RSMs vs
           the human matrix (Spearman and Pearson over the upper triangle), `alignet_data.evaluation.rsa`.
  Probe    1- and 10-shot linear probes (`alignet_data.evaluation.probing`) on the demo world's pool (basic-category
           labels) or on config["probe"]["split"] of embeddings artifacts; Wald CIs.
  Hierarchy  z-scored change of pairwise distances per relation (same subordinate / basic / superordinate /
           different superordinate) between config["hierarchy"]["base"] and ["aligned"] (demo world tree), and
           a 2-D PCA before/after coloured by superordinate.
  Comparisons  every other model vs the primary one on the same items (paired bootstrap; McNemar).
Writes report.json (= the returned report), report.md (one page, embedding the PNG plots). This module only wires
the config to the library: models are `evaluation.subjects`, the measuring `evaluation.analyses`, the rendering
`evaluation.report`.
Artifact, checkpoint and data URLs in the config are inputs of the stage (digested), so new inputs re-evaluate.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from alignet_data import artifacts, checks
from alignet_data.evaluation import analyses, metrics
from alignet_data.evaluation import report as rendering
from alignet_data.evaluation.report import PLOT, PLOT_HIERARCHY, PLOT_PCA, PLOT_RT
from alignet_data.evaluation.subjects import EMBEDDINGS_PREFIX, SAVEDMODEL_PREFIX, Subject, load_model, split_spec

STAGE = "evaluate"
BOOTSTRAP_PROTOCOLS = ("items_n", "paper")
TRAIN_PREFIX = "train:"


def default_config() -> dict[str, Any]:
  return {
      "world": "",   # demo world artifact URL ("" = no world: evaluate on the files below only)
      "train": "",   # train artifact URL, referenced by specs as "train:{train}"
      "models": {"student_before": "demo-student", "student_after": "train:{train}"},  # name -> spec (module doc)
      "things_triplets": "",     # (n, 3) (i, j, odd) file; "" = the world's THINGS-like test triplets
      "things_soft_labels": "",  # (n, 3) human pair probabilities [p01, p02, p12] for those triplets (.npy/.txt),
                                 # or a `human` artifact: its VICE p* of its test triplets
      "things_split": "things",  # split of embeddings artifacts holding the THINGS images (id = concept index)
      "things_tau": 1.0,         # temperature of the model's pair probabilities compared with soft labels
      "levels": "",              # released Levels response CSVs (a file, a directory, or a list)
      "levels_split": "train",   # split of embeddings artifacts holding the Levels/RSA images (by file name)
      "images": "",              # folder with the Levels/RSA images, for image models (found by base name)
      "rsa": [],                 # [{"name", "matrix", "stimuli", "kind": "rsm" | "rdm"}]
      "probe": {"shots": [1, 10], "repeats": 5, "probe": "ridge", "l2": None, "split": ""},
      "hierarchy": {"base": "student_before", "aligned": "student_after", "max_items": 600},
      # Intervals (each labelled with its method in the report): "items_n" resamples all n items (+ THINGS
      # objects for THINGS triplets); "paper" is the paper's protocol, resamples of `size` items. resamples
      # None = 1000 (items_n) or 100 (paper). An int: the number of resamples, protocol items_n.
      "bootstrap": {"protocol": "items_n", "resamples": None, "size": 1000},
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
                      help="a model to evaluate (repeatable): demo-student, <config>:<ckpt.npz>, train:<artifact>, "
                           "savedmodel:<dir>, embeddings:<artifact or .npy>; the first is the primary model")
  parser.add_argument("--embeddings", action="append", default=None, metavar="[NAME=]PATH",
                      help="evaluate precomputed embeddings (an embed artifact or an (n, d) .npy; repeatable); "
                           "NAME defaults to the file name")
  parser.add_argument("--transform", action="append", default=None, metavar="NAME=URL",
                      help="apply an align artifact's (or .npz) transform on top of model NAME")
  parser.add_argument("--things-triplets", default=None, help="THINGS triplet file (i, j, odd), 0-based")
  parser.add_argument("--things-soft-labels", default=None, help="(n, 3) human pair probabilities for them")
  parser.add_argument("--levels", action="append", default=None, help="released Levels CSV file or directory")
  parser.add_argument("--levels-split", default=None, help="embeddings split with the Levels/RSA images")
  parser.add_argument("--images", default=None, help="folder with the Levels/RSA images (image models embed them)")
  parser.add_argument("--rsa", action="append", default=None, metavar="NAME=MATRIX,STIMULI[,rdm]",
                      help="a human RSM (or RDM with ',rdm') and its stimulus list (repeatable)")
  parser.add_argument("--probe-split", default=None, help="embeddings split with labels for few-shot probing")
  parser.add_argument("--shots", default=None, help="comma-separated shots for probing, e.g. 1,10 ('' = none)")
  parser.add_argument("--bootstrap-protocol", choices=BOOTSTRAP_PROTOCOLS, default=None,
                      help="items_n (default): resample all n items, and THINGS objects; paper: the paper's 100 "
                      "resamples of 1,000 items (labelled bootstrap_subsample_1000)")
  parser.add_argument("--bootstrap-resamples", type=int, default=None, help="default 1000 (items_n) or 100 (paper)")
  parser.add_argument("--bootstrap-size", type=int, default=None,
                      help="items per resample of the paper's protocol (implies --bootstrap-protocol paper)")
  parser.add_argument("--seed", type=int, default=None)
  parser.add_argument("--entropy-tau", type=float, default=None)
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--no-plot", action="store_true", default=None, help="write no PNGs")


def _pair(item: str, flag: str, example: str) -> tuple[str, str]:
  name, sep, value = item.partition("=")
  if not sep or not name or not value:
    raise ValueError(f"{flag} {item!r}: expected NAME=VALUE, e.g. {example}")
  return name, value


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = default_config()
  for key in ("world", "train", "seed", "entropy_tau", "batch_size", "things_triplets", "things_soft_labels",
              "levels_split", "images"):
    if getattr(args, key, None) is not None:
      config[key] = getattr(args, key)
  models: dict[str, Any] = {}
  for item in getattr(args, "models", None) or []:
    name, spec = _pair(item, "--model", "student_after=train:runs/demo/train")
    models[name] = spec
  for item in getattr(args, "embeddings", None) or []:
    name, sep, path = item.partition("=")
    if not sep or "/" in name or not path:
      name, path = os.path.splitext(os.path.basename(item.rstrip("/")))[0], item
    models[name] = EMBEDDINGS_PREFIX + path
  if models:
    config["models"] = models
  for item in getattr(args, "transform", None) or []:
    name, url = _pair(item, "--transform", "teacher=runs/demo/align")
    if name not in config["models"]:
      raise ValueError(f"--transform {item!r}: no model named {name!r} (models: {sorted(config['models'])}).")
    config["models"][name] = {"model": split_spec(config["models"][name])[0], "transform": url}
  if getattr(args, "levels", None):
    config["levels"] = args.levels if len(args.levels) > 1 else args.levels[0]
  for item in getattr(args, "rsa", None) or []:
    name, value = _pair(item, "--rsa", "things=rsm.npy,stimuli.txt")
    parts = value.split(",")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("rsm", "rdm")):
      raise ValueError(f"--rsa {item!r}: expected NAME=MATRIX,STIMULI or NAME=MATRIX,STIMULI,rdm")
    config["rsa"].append({"name": name, "matrix": parts[0], "stimuli": parts[1],
                          "kind": parts[2] if len(parts) == 3 else "rsm"})
  if getattr(args, "probe_split", None) is not None:
    config["probe"] = {**config["probe"], "split": args.probe_split}
  if getattr(args, "shots", None) is not None:
    config["probe"] = {**config["probe"], "shots": [int(s) for s in args.shots.split(",") if s.strip()]}
  if getattr(args, "no_plot", None):
    config["plot"] = False
  boot = dict(config["bootstrap"])
  if getattr(args, "bootstrap_size", None) is not None:
    boot.update(protocol="paper", size=args.bootstrap_size)
  for key in ("protocol", "resamples"):
    if getattr(args, f"bootstrap_{key}", None) is not None:
      boot[key] = getattr(args, f"bootstrap_{key}")
  config["bootstrap"] = boot
  return config


def _bootstrap(config: dict[str, Any]) -> dict[str, Any]:
  """{"protocol", "resamples", "size"} with the protocol's defaults filled in (size None = all n items)."""
  boot = config["bootstrap"]
  if isinstance(boot, int):
    boot = {"resamples": boot}
  protocol = boot.get("protocol", "items_n")
  if protocol not in BOOTSTRAP_PROTOCOLS:
    raise ValueError(f"evaluate: bootstrap protocol must be one of {list(BOOTSTRAP_PROTOCOLS)}, got {protocol!r}.")
  resamples = boot.get("resamples")
  if protocol == "items_n":
    return {"protocol": protocol, "resamples": int(1000 if resamples is None else resamples), "size": None}
  size = boot.get("size")
  return {"protocol": protocol, "resamples": int(100 if resamples is None else resamples),
          "size": int(metrics.PAPER_SIZE if size is None else size)}


def model_specs(config: dict[str, Any]) -> dict[str, str | dict[str, Any]]:
  """The models to evaluate with "{train}" filled in; those that need an absent train artifact are left out."""
  out = {}
  for name, spec in config["models"].items():
    model, transform = split_spec(spec)
    if "{train}" in model:
      if not config.get("train"):
        continue
      model = model.replace("{train}", config["train"])
    out[name] = {"model": model, "transform": transform} if transform else model
  return out


def _levels_urls(config: dict[str, Any]) -> list[str]:
  levels = config.get("levels") or []
  return [levels] if isinstance(levels, str) else list(levels)


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  checks.require_min(config, STAGE, seed=0, entropy_tau=1e-9, batch_size=1)
  boot = _bootstrap(config)
  checks.require_min({"bootstrap_resamples": boot["resamples"], "bootstrap_size": boot["size"] or 1}, STAGE,
                     bootstrap_resamples=1, bootstrap_size=1)
  for shots in config["probe"].get("shots") or []:
    checks.require_min({"shots": shots}, STAGE, shots=1)
  urls = {"world": config["world"]} if config["world"] else {}
  for name, spec in sorted(model_specs(config).items()):
    model, transform = split_spec(spec)
    for prefix in (TRAIN_PREFIX, SAVEDMODEL_PREFIX, EMBEDDINGS_PREFIX):
      if model.startswith(prefix):
        urls[f"model_{name}"] = model[len(prefix):]
        break
    else:
      if ":" in model:
        urls[f"model_{name}"] = model.split(":", 1)[1]
    if transform:
      urls[f"transform_{name}"] = transform
  for key in ("things_triplets", "things_soft_labels", "images"):
    if config.get(key):
      urls[key] = config[key]
  for i, url in enumerate(_levels_urls(config)):
    urls[f"levels_{i}"] = url
  for entry in config.get("rsa") or []:
    urls[f"rsa_{entry['name']}_matrix"] = entry["matrix"]
    urls[f"rsa_{entry['name']}_stimuli"] = entry["stimuli"]
  return urls


def _load_model(spec: str) -> Any:
  """The image model of a spec; "train:<artifact>" is the trainer's student (the library does not import trainer)."""
  if spec.startswith(TRAIN_PREFIX):
    from trainer import train
    return train.load_student(spec[len(TRAIN_PREFIX):])
  return load_model(spec)


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  del beam_args  # Not a Beam stage.
  from tqdm import tqdm

  from alignet_data import demo_world

  specs = model_specs(config)
  if not specs:
    raise ValueError("No model to evaluate: config['models'] is empty (or needs config['train']); name one, "
                     "e.g. --embeddings spose49.npy or --model student=demo-student.")
  world = demo_world.load(config["world"]) if config["world"] else None
  if world is None and not (config.get("things_triplets") or config.get("things_soft_labels") or config.get("levels")
                            or config.get("rsa")
                            or (config.get("probe") or {}).get("split")):
    raise ValueError("Nothing to evaluate on: give a demo world (--world), THINGS triplets (--things-triplets), "
                     "Levels data (--levels), an RSA dataset (--rsa) or a labelled split (--probe-split).")
  b = _bootstrap(config)
  boot = {"n_resamples": b["resamples"], "size": b["size"], "seed": int(config["seed"])}
  seed = int(config["seed"])
  probe_cfg = {**default_config()["probe"], **(config.get("probe") or {})}
  tree = {**default_config()["hierarchy"], **(config.get("hierarchy") or {})}
  skipped: list[str] = []
  report: dict[str, Any] = {"primary": next(iter(specs)), "models": {}}
  correct: dict[str, Any] = {}  # task -> model -> per-item correctness, for the paired comparisons

  no_images = all(split_spec(s)[0].startswith(EMBEDDINGS_PREFIX) for s in specs.values())
  with tqdm(desc="evaluate: embed", unit="img", dynamic_ncols=True, disable=no_images) as bar:
    subjects = {name: Subject(name, spec, world, bar, batch_size=int(config["batch_size"]),
                              things_split=config["things_split"], images=config.get("images") or "", load=_load_model)
                for name, spec in specs.items()}
    report["models"] = {name: s.describe() for name, s in subjects.items()}
    part, hits, objects = analyses.things(subjects, world, triplets_url=config.get("things_triplets") or "",
                                 soft_labels_url=config.get("things_soft_labels") or "",
                                 tau=float(config["things_tau"]), primary=report["primary"], boot=boot, skipped=skipped)
    report.update(part)
    correct.update(hits)
    part, hits, rts = analyses.levels(subjects, world, levels_urls=_levels_urls(config),
                                      levels_split=config["levels_split"], max_rt=float(config["max_rt"]),
                                      entropy_tau=float(config["entropy_tau"]), boot=boot, skipped=skipped)
    report.update(part)
    correct.update(hits)
    report.update(analyses.rsa(subjects, config.get("rsa") or [], levels_split=config["levels_split"], boot=boot,
                               skipped=skipped))
    part, hits = analyses.probe(subjects, world, probe_cfg, seed=seed, skipped=skipped)
    report.update(part)
    correct.update(hits)
    part, pca = analyses.hierarchy(subjects, world, base=tree["base"], aligned=tree["aligned"],
                                   max_items=int(tree["max_items"]), seed=seed, boot=boot, skipped=skipped)
    report.update(part)
  report["comparisons"] = analyses.comparisons(report["primary"], correct, boot, objects)
  report["bootstrap"] = {"protocol": b["protocol"], "resamples": boot["n_resamples"], "size": boot["size"],
                         "seed": boot["seed"], "level": 0.95,
                         "methods": metrics.describe_methods(rendering.interval_methods(report))}
  report["skipped"] = skipped

  plots = []
  if config.get("plot", True):
    for name, fn, ok in ((PLOT, lambda f: rendering.plot_levels(report, f), "levels" in report),
                         (PLOT_RT, lambda f: rendering.plot_entropy_rt(rts, f), bool(rts)),
                         (PLOT_PCA, lambda f: rendering.plot_pca(pca, f), pca is not None),
                         (PLOT_HIERARCHY, lambda f: rendering.plot_hierarchy(report["hierarchy"], f),
                          "hierarchy" in report)):
      if ok:
        with writer.open(name, "wb") as f:
          fn(f)
        plots.append(name)
  report["plots"] = plots
  with writer.open("report.md", "wb") as f:
    f.write(rendering.markdown(report).encode())
  return report
