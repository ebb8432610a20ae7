"""The `evaluate` stage: human-alignment and downstream metrics of any model, each with its 95% CI and n.

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
           triplets), bootstrap CI; with soft labels (config["things_soft_labels"], or the world's), the KL of
           human to model pair probabilities and their Pearson/Spearman correlation.
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
Writes report.json (= the returned report), report.md (one page, embedding the PNG plots).
Artifact, checkpoint and data URLs in the config are inputs of the stage (digested), so new inputs re-evaluate.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, checks, numeric_files, triplet_math
from alignet_data.checks import require_finite
from alignet_data.evaluation import metrics

STAGE = "evaluate"
TRAIN_PREFIX = "train:"
SAVEDMODEL_PREFIX = "savedmodel:"
EMBEDDINGS_PREFIX = "embeddings:"
PLOT = "levels_accuracy.png"
PLOT_RT = "entropy_rt.png"
PLOT_PCA = "pca.png"
PLOT_HIERARCHY = "hierarchy.png"


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
  parser.add_argument("--bootstrap-resamples", type=int, default=None)
  parser.add_argument("--bootstrap-size", type=int, default=None)
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
    config["models"][name] = {"model": _split_spec(config["models"][name])[0], "transform": url}
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


def _levels_urls(config: dict[str, Any]) -> list[str]:
  levels = config.get("levels") or []
  return [levels] if isinstance(levels, str) else list(levels)


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  checks.require_min(config, STAGE, seed=0, entropy_tau=1e-9, batch_size=1)
  boot = _bootstrap(config)
  checks.require_min({"bootstrap_resamples": boot["resamples"], "bootstrap_size": boot["size"]}, STAGE,
                     bootstrap_resamples=1, bootstrap_size=1)
  for shots in config["probe"].get("shots") or []:
    checks.require_min({"shots": shots}, STAGE, shots=1)
  urls = {"world": config["world"]} if config["world"] else {}
  for name, spec in sorted(model_specs(config).items()):
    model, transform = _split_spec(spec)
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


# ------------------------------------------------------------------------------------------------ subjects


class Unavailable(Exception):
  """A model cannot provide the vectors a metric needs (e.g. a .npy has no file names): the part is skipped."""


def load_model(spec: str) -> Any:
  """A LoadedModel (or SavedModelEncoder) from an image-model spec string (see the module doc)."""
  if spec.startswith(TRAIN_PREFIX):
    from trainer import train
    return train.load_student(spec[len(TRAIN_PREFIX):])
  if spec.startswith(SAVEDMODEL_PREFIX):
    from alignet_data.evaluation import savedmodel
    return savedmodel.load(spec[len(SAVEDMODEL_PREFIX):])
  from alignet_data import models
  return models.load_model(spec)


def embed_images(model: Any, images: np.ndarray, batch_size: int, bar: Any = None) -> np.ndarray:
  """uint8 images -> (n, dim) float32 representations; fixed-size batches so the model compiles once."""
  from alignet_data.models import batching
  return batching.embed_padded(model.embed_preprocessed, images, batch_size, prepare=model.preprocess,
                               dim=model.dim, progress=bar.update if bar is not None else None)


def embed_files(model: Any, urls: Sequence[str], batch_size: int, bar: Any = None) -> np.ndarray:
  """Image files of any size -> (n, dim): each is decoded and preprocessed on its own (the model's resize and
  value range), then embedded in fixed-size batches."""
  from alignet_data.models import batching
  from alignet_data.teacher import image_sources

  def prepare(chunk: Sequence[str]) -> np.ndarray:
    out = []
    for url in chunk:
      fs, path = artifacts.url_to_fs(url)
      with fs.open(path, "rb") as f:
        try:
          out.append(model.preprocess(image_sources.decode_image(f.read())))
        except ValueError as e:
          raise ValueError(f"{url}: {e}") from None
    return np.concatenate(out)
  return batching.embed_padded(model.embed_preprocessed, list(urls), batch_size, prepare=prepare, dim=model.dim,
                               progress=bar.update if bar is not None else None)


def _key(name: str) -> str:
  from alignet_data.evaluation import levels
  return levels.image_key(name)


class Subject:
  """One model under evaluation: gives (transformed) vectors for THINGS concepts, world pool images, named
  images of an embeddings split, or a labelled split; caches what it computes."""

  def __init__(self, name: str, spec: str | dict[str, Any], config: dict[str, Any], world: Any, bar: Any):
    from alignet_data.teacher.transform import Transform
    self.name, self.spec, self.world, self.bar = name, spec, world, bar
    model, transform = _split_spec(spec)
    self.transform = Transform.load(transform) if transform else None
    self.batch_size = int(config["batch_size"])
    self.things_split = config["things_split"]
    self.images = config.get("images") or ""
    self._cache: dict[Any, Any] = {}
    self.matrix = self.artifact = self.model = None
    if model.startswith(EMBEDDINGS_PREFIX):
      url = model[len(EMBEDDINGS_PREFIX):]
      if numeric_files.is_array_file(url):  # A bare matrix; finite, or NaN would score as a hit.
        self.matrix = numeric_files.read_matrix(url, npz_keys=("embeddings",), what="(n, d) embedding matrix")
        self.kind, self.dim = "npy", int(self.matrix.shape[1])
      else:
        from alignet_data.teacher import embeddings
        self.artifact = artifacts.load(url, stage="embed")
        info = embeddings.info(self.artifact)
        self.kind, self.dim = "embeddings", int(next(iter(info["splits"].values()))["dim"])
    else:
      self.model = load_model(model)
      self.kind, self.dim = "model", int(self.model.dim)

  def describe(self) -> dict[str, Any]:
    out = {"spec": self.spec, "kind": self.kind, "dim": self.dim}
    if self.model is not None:
      out["config"] = self.model.config.get("name")
    return out

  def _out(self, x: np.ndarray) -> np.ndarray:
    """Vectors as evaluated: with the transform, checked for overflow (inputs were checked where they entered)."""
    x = np.asarray(x, np.float32)
    if self.transform is None:
      return x
    return require_finite(self.transform.apply(x), f"{self.name}: vectors after its transform")

  def _split(self, split: str) -> Any:
    from alignet_data.teacher import embeddings
    if ("split", split) not in self._cache:
      try:
        self._cache[("split", split)] = embeddings.load(self.artifact, split)
      except KeyError as e:
        raise Unavailable(str(e).strip('"')) from None
    return self._cache[("split", split)]

  def _world_images(self, which: str) -> np.ndarray:
    if self.world is None:
      raise Unavailable(f"{self.name} is an image model: it needs the images (a demo world, or embed them with "
                        "`alignet embed` and evaluate the embeddings)")
    if which not in self._cache:
      images = self.world.things_images if which == "things" else self.world.pool_images
      self._cache[which] = require_finite(embed_images(self.model, images, self.batch_size, self.bar),
                                          f"{self.name}: the model's vectors of the world's {which} images")
    return self._cache[which]

  def things(self, n_objects: int | None = None, source: str = "the triplets") -> np.ndarray:
    """(n_objects, d) vectors of THINGS concepts 0..n-1 (the triplet files' indices; `source` names them)."""
    if self.kind == "npy":
      x = self.matrix
    elif self.kind == "embeddings":
      emb = self._split(self.things_split)
      n = n_objects if n_objects is not None else int(emb.ids.max()) + 1
      x = emb.take(np.arange(n))
    else:
      x = self._world_images("things")
    if n_objects is not None and len(x) < n_objects:
      raise ValueError(f"{self.name}: {len(x)} THINGS vectors, but {source} index {n_objects} objects "
                       f"(0..{n_objects - 1}).")
    return self._out(x)

  def pool(self) -> np.ndarray:
    """(N, d) vectors of every demo-world pool image (by pool index)."""
    if self.kind == "npy":
      raise Unavailable(f"{self.name} is a bare .npy matrix (no pool split)")
    if self.kind == "embeddings":
      emb = self._split("pool")
      return self._out(emb.take(np.arange(len(self.world.pool_images))))
    return self._out(self._world_images("pool"))

  def by_name(self, split: str, names: Sequence[str]) -> np.ndarray:
    """Vectors of images named by file (base name, no extension) in an embeddings split; a .npy by row number."""
    names = [str(n) for n in names]
    if self.kind == "npy":
      if all(n.strip().isdigit() for n in names):
        return self._out(self.matrix[np.array([int(n) for n in names])])
      raise Unavailable(f"{self.name} is a bare .npy matrix: it can only match stimuli given as row numbers")
    if self.kind == "model":
      return self._out(self._image_files(names))
    emb = self._split(split)
    if ("keys", split) not in self._cache:
      self._cache[("keys", split)] = {_key(f): i for i, f in enumerate(emb.file_names)}
    index = self._cache[("keys", split)]
    rows = [index.get(_key(n), -1) for n in names]
    missing = [n for n, r in zip(names, rows, strict=True) if r < 0]
    if missing:
      raise Unavailable(f"{len(missing)} of {len(names)} images are not in split {split!r} of {self.name} "
                        f"(e.g. {missing[:3]})")
    return self._out(emb.vectors[np.array(rows)])

  def _image_files(self, names: Sequence[str]) -> np.ndarray:
    if not self.images:
      raise Unavailable(f"{self.name} is an image model: give the folder of the images (--images), or embed them "
                        "with `alignet embed` and evaluate the embeddings artifact")
    if "files" not in self._cache:
      fs, root = artifacts.url_to_fs(self.images)
      if not fs.isdir(root):
        raise FileNotFoundError(f"Image folder not found: {self.images}")
      protocol = self.images.split("://", 1)[0] + "://" if "://" in self.images else ""
      self._cache["files"] = {_key(p): protocol + p for p in sorted(fs.find(root))}
    files = self._cache["files"]
    missing = [n for n in names if _key(n) not in files]
    if missing:
      raise Unavailable(f"{len(missing)} of {len(names)} images are not in {self.images} (e.g. {missing[:3]})")
    key = ("named", tuple(names))
    if key not in self._cache:
      self._cache[key] = require_finite(embed_files(self.model, [files[_key(n)] for n in names], self.batch_size,
                                                    self.bar), f"{self.name}: the model's vectors of {self.images}")
    return self._cache[key]

  def labelled(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, labels) for probing: a labelled embeddings split, else the world pool's basic categories."""
    if split:
      if self.kind != "embeddings":
        raise Unavailable(f"{self.name} has no embeddings split {split!r} to probe")
      emb = self._split(split)
      return self._out(emb.vectors), emb.labels
    if self.world is None:
      raise Unavailable("no labelled data: give a demo world or probe.split of an embeddings artifact")
    return self.pool(), np.asarray(self.world.pool_labels)


# --------------------------------------------------------------------------------------------------- run


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
  skipped: list[str] = []
  report: dict[str, Any] = {"primary": next(iter(specs)), "models": {}}
  keep: dict[str, Any] = {"correct": {}, "rt": {}}

  no_images = all(_split_spec(s)[0].startswith(EMBEDDINGS_PREFIX) for s in specs.values())
  with tqdm(desc="evaluate: embed", unit="img", dynamic_ncols=True, disable=no_images) as bar:
    subjects = {name: Subject(name, spec, config, world, bar) for name, spec in specs.items()}
    report["models"] = {name: s.describe() for name, s in subjects.items()}
    _things(config, world, subjects, boot, report, keep, skipped)
    _levels(config, world, subjects, boot, report, keep, skipped)
    _rsa(config, subjects, boot, report, skipped)
    _probe(config, world, subjects, report, keep, skipped)
    pca = _hierarchy(config, world, subjects, boot, report, skipped)
  report["comparisons"] = _comparisons(report["primary"], keep, boot)
  report["bootstrap"] = {"resamples": boot["n_resamples"], "size": boot["size"], "seed": boot["seed"]}
  report["skipped"] = skipped

  plots = []
  if config.get("plot", True):
    for name, fn, ok in ((PLOT, lambda f: plot_levels(report, f), "levels" in report),
                         (PLOT_RT, lambda f: plot_entropy_rt(keep["rt"], f), bool(keep["rt"])),
                         (PLOT_PCA, lambda f: plot_pca(pca, f), pca is not None),
                         (PLOT_HIERARCHY, lambda f: plot_hierarchy(report["hierarchy"], f), "hierarchy" in report)):
      if ok:
        with writer.open(name, "wb") as f:
          fn(f)
        plots.append(name)
  report["plots"] = plots
  with writer.open("report.md", "wb") as f:
    f.write(markdown(report).encode())
  return report


def _try(skipped: list[str], what: str, fn: Any) -> Any:
  try:
    return fn()
  except Unavailable as e:
    skipped.append(f"{what}: {e}")
    return None


def _things(config, world, subjects, boot, report, keep, skipped) -> None:
  from alignet_data.human import things
  # Soft labels from a `human` artifact come with their own (test) triplets.
  human_art = artifacts.try_load(config["things_soft_labels"]) if config.get("things_soft_labels") else None
  human = things.read_soft_labels(human_art.url) if human_art is not None else None  # Checked: finite p*.
  if config.get("things_triplets"):
    triplets = things.load_triplets(config["things_triplets"])
    source = config["things_triplets"]
  elif human is not None:
    triplets, source = np.asarray(human["test_triplets"]), f"{config['things_soft_labels']}:test_triplets"
  elif world is not None:
    triplets, source = np.asarray(world.things_test), "world:things_test"
  else:
    return
  soft = None
  if config.get("things_soft_labels"):
    if human is not None and not np.array_equal(human["test_triplets"], triplets):
      raise ValueError(f"The soft labels of {config['things_soft_labels']} are for its own test triplets, not for "
                       f"{config['things_triplets']}: leave --things-triplets out to use them.")
    if human is not None:
      soft = np.asarray(human["test_probs"], np.float64)
    else:
      soft = numeric_files.read_array(config["things_soft_labels"], npz_keys=("probs", "test_probs", "soft_labels"),
                                      what="(n, 3) soft-label array").astype(np.float64)
      require_finite(soft, f"Soft labels {config['things_soft_labels']}")
    if soft.shape != triplets.shape:
      raise ValueError(f"things_soft_labels {config['things_soft_labels']} has shape {soft.shape}; it needs one "
                       f"row of 3 pair probabilities per triplet: {triplets.shape}.")
  elif not config.get("things_triplets") and world is not None:
    soft = np.asarray(world.things_test_probs, np.float64)
  n_objects = int(triplets.max()) + 1
  per_model = {}
  for name, s in subjects.items():
    x = _try(skipped, f"things/{name}", lambda s=s: s.things(n_objects, source))
    if x is None:
      continue
    sims = triplet_math.triplet_similarities(np.asarray(x, np.float64), triplets)
    row = metrics.things_accuracy(sims, **boot)
    correct = triplet_math.odd_one_out_correct(sims, 2)
    row["wald_ci"] = metrics.wald_ci(row["accuracy"], row["n"])
    if soft is not None:
      row["soft"] = metrics.things_soft(sims, soft, tau=float(config["things_tau"]), **boot)
    per_model[name] = row
    keep["correct"].setdefault("things", {})[name] = correct
  if per_model:
    primary = report["primary"] if report["primary"] in per_model else next(iter(per_model))
    # Top level: the primary model's figures (things.accuracy, things.ci, ...); per_model: every model's.
    report["things"] = {**per_model[primary], "model": primary, "triplets": source, "per_model": per_model}


def _levels(config, world, subjects, boot, report, keep, skipped) -> None:
  max_rt = float(config["max_rt"])
  if _levels_urls(config):
    from alignet_data.evaluation import levels as levels_lib
    data = levels_lib.load(_levels_urls(config))
    choices, level, rt = data.choices, data.level, data.rt
    names, local = np.unique(data.images, return_inverse=True)
    local = local.reshape(data.images.shape)
    get = lambda s: s.by_name(config["levels_split"], names)
    report["levels_data"] = data.summary()
  elif world is not None:
    choices, level, rt = world.levels_choices, world.levels_level, world.levels_rt
    ids, local = np.unique(world.levels_triplets, return_inverse=True)
    local = local.reshape(world.levels_triplets.shape)
    get = lambda s: s.pool()[ids]
  else:
    return
  human = metrics.levels_human(choices, level, rt, max_rt=max_rt, **boot)
  out: dict[str, Any] = {}
  majority = metrics.majority_vote(choices)
  log_rt = metrics.mean_log_rt(rt, max_rt)
  for name, s in subjects.items():
    x = _try(skipped, f"levels/{name}", lambda s=s: get(s))
    if x is None:
      continue
    sims = triplet_math.triplet_similarities(np.asarray(x, np.float64), local)
    out[name] = metrics.levels_model(sims, choices, level, rt, entropy_tau=float(config["entropy_tau"]),
                                        max_rt=max_rt, **boot)
    correct = triplet_math.odd_one_out_correct(sims, majority)
    correct[majority < 0] = np.nan
    for lv in metrics._levels_present(np.asarray(level)):
      keep["correct"].setdefault(f"levels/{lv}", {})[name] = np.where(np.asarray(level) == lv, correct, np.nan)
    keep["rt"][name] = {"entropy": metrics.model_entropy(sims, float(config["entropy_tau"])), "log_rt": log_rt,
                        "level": np.asarray(level)}
  if not out:
    return
  report["levels"] = out  # levels[model][level] = {accuracy, ci, n, n_no_majority, entropy_rt_spearman}
  report["human"] = human  # human[level] = {noise_ceiling: {value, ci, n}, n_triplets, n_no_majority, mean_log_rt}
  report["accuracy"] = {name: metrics.flat_accuracies(r) for name, r in out.items()}
  report["noise_ceiling"] = {lv: row["noise_ceiling"]["value"] for lv, row in human.items()}
  report["entropy_rt_spearman"] = {name: {lv: row["entropy_rt_spearman"]["value"] for lv, row in r.items()
                                          if "entropy_rt_spearman" in row} for name, r in out.items()}
  report["majority_ties"] = ("triplets whose responses have no unique majority are excluded from accuracy "
                             "(counted in n_no_majority)")


def _rsa(config, subjects, boot, report, skipped) -> None:
  from alignet_data.evaluation import rsa
  out: dict[str, Any] = {}
  for entry in config.get("rsa") or []:
    human = rsa.load_human(entry["matrix"], entry["stimuli"], entry.get("kind", "rsm"))
    split = entry.get("split", config["levels_split"])
    rows = {}
    for name, s in subjects.items():
      x = _try(skipped, f"rsa/{entry['name']}/{name}",
               lambda s=s, split=split, human=human: s.by_name(split, human.stimuli))
      if x is not None:
        rows[name] = rsa.rsa(x, human, n_resamples=boot["n_resamples"], seed=boot["seed"])
    out[entry["name"]] = {"kind": human.kind, "stimuli": len(human.stimuli), "models": rows}
  if out:
    report["rsa"] = out  # rsa[dataset]["models"][model][kernel][spearman|pearson] = {value, ci, n}


def _probe(config, world, subjects, report, keep, skipped) -> None:
  from alignet_data.evaluation import probing
  cfg = {**default_config()["probe"], **(config.get("probe") or {})}
  if not cfg["shots"] or (world is None and not cfg["split"]):
    return
  out = {}
  for name, s in subjects.items():
    data = _try(skipped, f"probe/{name}", lambda s=s: s.labelled(cfg["split"]))
    if data is None:
      continue
    x, labels = data
    out[name] = probing.few_shot(x, labels, cfg["shots"], repeats=int(cfg["repeats"]), seed=int(config["seed"]),
                                 probe=cfg["probe"], l2=cfg["l2"])
    for k in cfg["shots"]:
      keep["correct"].setdefault(f"probe/{k}shot", {})[name] = probing.correct_vector(
          x, labels, int(k), seed=int(config["seed"]), probe=cfg["probe"], l2=cfg["l2"])
  if out:
    report["probe"] = out  # probe[model][f"{k}shot"] = {accuracy, ci (Wald), n, ...}


def _hierarchy(config, world, subjects, boot, report, skipped) -> dict[str, Any] | None:
  from alignet_data.evaluation import representation
  cfg = {**default_config()["hierarchy"], **(config.get("hierarchy") or {})}
  if world is None or cfg["base"] not in subjects or cfg["aligned"] not in subjects:
    return None
  idx = representation.subsample(len(world.pool_images), int(cfg["max_items"]), int(config["seed"]))
  xs = {}
  for role in ("base", "aligned"):
    name = cfg[role]
    x = _try(skipped, f"hierarchy/{name}", lambda name=name: subjects[name].pool())
    if x is None:
      return None
    xs[role] = np.asarray(x, np.float64)[idx]
  sub = np.asarray(world.pool_concepts)[idx]
  basic = np.asarray(world.concept_basic)[sub]
  sup = np.asarray(world.concept_super)[sub]
  change = representation.distance_change(xs["base"], xs["aligned"], sub, basic, sup,
                                          n_resamples=boot["n_resamples"], seed=boot["seed"])
  pca: dict[str, Any] = {"superordinate": sup, "base_name": cfg["base"], "aligned_name": cfg["aligned"]}
  variance = {}
  for role in ("base", "aligned"):
    pca[role], ratio = representation.pca_2d(xs[role])
    variance[role] = pca[f"{role}_variance"] = [float(v) for v in ratio]
  report["hierarchy"] = {"base": cfg["base"], "aligned": cfg["aligned"], "images": int(len(idx)),
                         "distance_change": change, "pca_explained_variance": variance}
  return pca


def _comparisons(primary: str, keep: dict[str, Any], boot: dict[str, Any]) -> dict[str, Any]:
  """Every other model minus the primary one, per task, on the same items."""
  out: dict[str, Any] = {}
  for task, by_model in keep["correct"].items():
    if primary not in by_model:
      continue
    for name, values in by_model.items():
      if name != primary:
        out.setdefault(f"{name}_vs_{primary}", {})[task] = metrics.paired_comparison(
            values, by_model[primary], **boot)
  return out


# ------------------------------------------------------------------------------------------------ output


def _fmt(row: dict[str, Any], key: str = "accuracy") -> str:
  value = row.get(key, row.get("value"))
  return f"{value:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]"


def markdown(report: dict[str, Any]) -> str:
  """A one-page summary: every figure with its 95% CI and n, the plots embedded."""
  lines = ["# Evaluation", "", "Models: " + ", ".join(f"`{n}` ({m['kind']}, d={m['dim']})"
                                                     for n, m in report["models"].items())
           + f". Bootstrap: {report['bootstrap']['resamples']} resamples of up to {report['bootstrap']['size']} "
           "items; intervals are 95%.", ""]
  if "things" in report:
    t = report["things"]
    tau = next((r["soft"]["tau"] for r in t["per_model"].values() if "soft" in r), None)
    lines += [f"## THINGS odd-one-out ({t['triplets']})", "",
              "Accuracy: ties count as wrong." + (f" Soft labels: model probabilities softmax(s / {tau:g}) vs the "
                                                 "human ones." if tau is not None else ""), "",
              "| model | accuracy [95% CI] | n | KL(human‖model) "
              "| Pearson r | Spearman rho |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in t["per_model"].items():
      soft = r.get("soft")
      extra = (f"{_fmt(soft['kl'], 'value')} | {_fmt(soft['pearson'])} | {_fmt(soft['spearman'])}" if soft
               else "| |")
      lines.append(f"| {name} | {_fmt(r)} | {r['n']} | {extra} |")
    lines.append("")
  if "levels" in report:
    levels = [lv for lv in metrics.LEVELS if lv in report["noise_ceiling"]]
    lines += ["## Levels", "", "Odd-one-out accuracy against the majority of the responses [95% CI] (n triplets "
              "with a majority).", "", "| model | " + " | ".join(levels) + " |", "|" + " --- |" * (len(levels) + 1)]
    for name, r in report["levels"].items():
      lines.append(f"| {name} | " + " | ".join(f"{_fmt(r[lv])} n={r[lv]['n']}" for lv in levels) + " |")
    lines.append("| human noise ceiling (LOO) | " + " | ".join(
        _fmt(report["human"][lv]["noise_ceiling"], "value") for lv in levels) + " |")
    lines += ["", "Spearman rho of model entropy vs mean log RT (RT > 10 s dropped):", "",
              "| model | " + " | ".join(levels) + " |", "|" + " --- |" * (len(levels) + 1)]
    for name, r in report["levels"].items():
      lines.append(f"| {name} | " + " | ".join(_fmt(r[lv]["entropy_rt_spearman"], "value")
                                               if "entropy_rt_spearman" in r[lv] else "" for lv in levels) + " |")
    lines.append("| humans (entropy of the responses) | " + " | ".join(
        _fmt(report["human"][lv]["entropy_rt_spearman"], "value") if "entropy_rt_spearman" in report["human"][lv]
        else "" for lv in levels) + " |")
    lines.append("")
    if PLOT in report.get("plots", []):
      lines += [f"![per-level accuracy]({PLOT})", ""]
    if PLOT_RT in report.get("plots", []):
      lines += [f"![entropy vs RT]({PLOT_RT})", ""]
  for ds, r in (report.get("rsa") or {}).items():
    lines += [f"## RSA: {ds} ({r['kind']}, {r['stimuli']} stimuli)", "",
              "| model | Pearson-kernel, Spearman | Pearson-kernel, Pearson | cosine, Spearman | cosine, Pearson |",
              "| --- | --- | --- | --- | --- |"]
    for name, k in r["models"].items():
      lines.append(f"| {name} | " + " | ".join(_fmt(k[kern][m], "value") for kern in ("pearson", "cosine")
                                               for m in ("spearman", "pearson")) + " |")
    lines.append("")
  if "probe" in report:
    shots = list(next(iter(report["probe"].values())))
    lines += ["## Few-shot linear probe (Wald 95% CI)", "", "| model | " + " | ".join(shots) + " |",
              "|" + " --- |" * (len(shots) + 1)]
    for name, r in report["probe"].items():
      lines.append(f"| {name} | " + " | ".join(f"{_fmt(r[s])} n={r[s]['n']}" for s in shots) + " |")
    lines.append("")
  if "hierarchy" in report:
    h = report["hierarchy"]
    lines += [f"## Representation change along the hierarchy ({h['base']} -> {h['aligned']}, {h['images']} images)",
              "", "Mean change of z-scored pairwise distance (negative = closer after alignment).", "",
              "| relation | change [95% CI] | pairs |", "| --- | --- | --- |"]
    for rel, r in h["distance_change"].items():
      lines.append(f"| {rel} | {_fmt(r, 'value')} | {r['n']} |")
    lines.append("")
    for name, alt in ((PLOT_HIERARCHY, "distance change"), (PLOT_PCA, "PCA before/after")):
      if name in report.get("plots", []):
        lines += [f"![{alt}]({name})", ""]
  if report.get("comparisons"):
    lines += [f"## Paired comparisons (model - {report['primary']}, same items)", "",
              "| comparison | task | difference [95% CI] | n | McNemar p |", "| --- | --- | --- | --- | --- |"]
    for comp, tasks in report["comparisons"].items():
      for task, r in tasks.items():
        p = ("< 1e-300" if r["p_value"] == 0 else f"{r['p_value']:.3g}") if "p_value" in r else ""
        lines.append(f"| {comp} | {task} | {_fmt(r, 'difference')} | {r['n']} | {p} |")
    lines.append("")
  if report.get("skipped"):
    lines += ["Skipped: " + "; ".join(report["skipped"]), ""]
  return "\n".join(lines)


def _pyplot() -> Any:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig: Any, fileobj: Any) -> None:
  fig.savefig(fileobj, format="png", metadata={"Software": None})
  _pyplot().close(fig)


def plot_levels(report: dict[str, Any], fileobj: Any) -> None:
  """Grouped bars: per level, one bar per model with its 95% CI; the human noise ceiling as a dashed line."""
  plt = _pyplot()
  levels = [lv for lv in metrics.LEVELS if lv in report["noise_ceiling"]]
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
  _save(fig, fileobj)


def plot_entropy_rt(data: dict[str, dict[str, np.ndarray]], fileobj: Any) -> None:
  """One panel per level: model entropy vs the triplet's mean log RT, one colour per model, with Spearman rho."""
  plt = _pyplot()
  first = next(iter(data.values()))
  levels = metrics._levels_present(first["level"])
  fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.2), dpi=100, squeeze=False)
  for ax, lv in zip(axes[0], levels, strict=True):
    for i, (name, d) in enumerate(data.items()):
      sel = (d["level"] == lv) & np.isfinite(d["log_rt"])
      rho = metrics.spearman(d["entropy"][sel], d["log_rt"][sel])
      ax.scatter(d["entropy"][sel], d["log_rt"][sel], s=6, alpha=0.5, color=f"C{i}",
                 label=f"{name} (rho={rho:.2f})")
    ax.set_title(lv)
    ax.set_xlabel("model entropy (nats)")
    ax.legend(fontsize=7, loc="lower right")
  axes[0][0].set_ylabel("mean log RT (s)")
  fig.tight_layout()
  _save(fig, fileobj)


def plot_pca(pca: dict[str, Any], fileobj: Any) -> None:
  """First two principal components of the base and the aligned model, coloured by superordinate category."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.6), dpi=100)
  sup = pca["superordinate"]
  for ax, role in zip(axes, ("base", "aligned"), strict=True):
    xy = pca[role]
    for c in np.unique(sup):
      sel = sup == c
      ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=f"C{int(c) % 10}", label=f"super {int(c)}")
    var = pca[f"{role}_variance"]
    ax.set_title(f"{role}: {pca[f'{role}_name']}")
    ax.set_xlabel(f"PC 1 ({100 * var[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * var[1]:.0f}%)")
    ax.set_xticks([])
    ax.set_yticks([])
  axes[1].legend(fontsize=7, loc="best", markerscale=2)
  fig.tight_layout()
  _save(fig, fileobj)


def plot_hierarchy(h: dict[str, Any], fileobj: Any) -> None:
  """Mean z-scored distance change per relation with its 95% CI (below 0: closer after alignment)."""
  plt = _pyplot()
  rels = list(h["distance_change"])
  vals = np.array([h["distance_change"][r]["value"] for r in rels])
  ci = np.array([h["distance_change"][r]["ci"] for r in rels])
  fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
  ax.bar(np.arange(len(rels)), vals, yerr=[vals - ci[:, 0], ci[:, 1] - vals], capsize=3,
         color=["C2" if v < 0 else "C3" for v in vals])
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(rels)), [r.replace("_", "\n") for r in rels], fontsize=8)
  ax.set_ylabel("change in z-scored distance")
  ax.set_title(f"{h['base']} -> {h['aligned']}", fontsize=9)
  fig.tight_layout()
  _save(fig, fileobj)
