"""The evaluate stage's analyses: one function per part of the report, over `subjects.Subject`s.

Each takes the subjects, its data and settings as plain values and `boot` ({n_resamples, size, seed}, the
bootstrap of every CI; size None = all n items); it returns the report entries it measured (empty when its data
are not configured) and, for the paired comparisons, each model's per-item correctness vectors by task ({task:
{model: vector}}). A subject that cannot give the vectors a part needs is left out of it, the reason appended to
`skipped`.
Nothing here writes files (`report` renders).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, numeric_files, triplet_math
from alignet_data.checks import require_finite
from alignet_data.evaluation import metrics
from alignet_data.evaluation.subjects import Subject, Unavailable

Subjects = Mapping[str, Subject]


def _try(skipped: list[str], what: str, fn: Callable[[], Any]) -> Any:
  try:
    return fn()
  except Unavailable as e:
    skipped.append(f"{what}: {e}")
    return None


def _things_data(world: Any, triplets_url: str, soft_labels_url: str) -> tuple[Any, str, Any] | None:
  """(triplets, their source, human pair probabilities or None): the files', a `human` artifact's, or the world's."""
  from alignet_data.human import things
  # Soft labels from a `human` artifact come with their own (test) triplets.
  human_art = artifacts.try_load(soft_labels_url) if soft_labels_url else None
  human = things.read_soft_labels(human_art.url) if human_art is not None else None  # Checked: finite p*.
  if triplets_url:
    triplets = things.load_triplets(triplets_url)
    source = triplets_url
  elif human is not None:
    triplets, source = np.asarray(human["test_triplets"]), f"{soft_labels_url}:test_triplets"
  elif world is not None:
    triplets, source = np.asarray(world.things_test), "world:things_test"
  else:
    return None
  soft = None
  if soft_labels_url:
    if human is not None and not np.array_equal(human["test_triplets"], triplets):
      raise ValueError(f"The soft labels of {soft_labels_url} are for its own test triplets, not for "
                       f"{triplets_url}: leave --things-triplets out to use them.")
    if human is not None:
      soft = np.asarray(human["test_probs"], np.float64)
    else:
      soft = numeric_files.read_array(soft_labels_url, npz_keys=("probs", "test_probs", "soft_labels"),
                                      what="(n, 3) soft-label array").astype(np.float64)
      require_finite(soft, f"Soft labels {soft_labels_url}")
    if soft.shape != triplets.shape:
      raise ValueError(f"things_soft_labels {soft_labels_url} has shape {soft.shape}; it needs one "
                       f"row of 3 pair probabilities per triplet: {triplets.shape}.")
  elif not triplets_url and world is not None:
    soft = np.asarray(world.things_test_probs, np.float64)
  return triplets, source, soft


def things(subjects: Subjects, world: Any, *, triplets_url: str, soft_labels_url: str, tau: float, primary: str,
           boot: dict[str, Any], skipped: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """THINGS odd-one-out accuracy (ties wrong) and, with soft labels, KL and correlations to the human ones.

  Intervals: the item bootstrap and the object bootstrap (the triplets' objects), plus Wald for accuracy.
  Returns (report entries, correctness by task, the triplets' object ids by task for paired comparisons).
  """
  data = _things_data(world, triplets_url, soft_labels_url)
  if data is None:
    return {}, {}, {}
  triplets, source, soft = data
  n_objects = int(triplets.max()) + 1
  per_model, correct = {}, {}
  for name, s in subjects.items():
    x = _try(skipped, f"things/{name}", lambda s=s: s.things(n_objects, source))
    if x is None:
      continue
    sims = triplet_math.triplet_similarities(np.asarray(x, np.float64), triplets)
    row = metrics.things_accuracy(sims, objects=triplets, **boot)
    correct[name] = triplet_math.odd_one_out_correct(sims)
    if soft is not None:
      row["soft"] = metrics.things_soft(sims, soft, tau=tau, objects=triplets, **boot)
    per_model[name] = row
  if not per_model:
    return {}, {}, {}
  primary = primary if primary in per_model else next(iter(per_model))
  # Top level: the primary model's figures (things.accuracy, things.ci, ...); per_model: every model's.
  entry = {**per_model[primary], "model": primary, "triplets": source, "per_model": per_model}
  return {"things": entry}, {"things": correct}, {"things": np.asarray(triplets)}


def levels(subjects: Subjects, world: Any, *, levels_urls: Sequence[str], levels_split: str, max_rt: float,
           entropy_tau: float, boot: dict[str, Any], skipped: list[str]
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Per Levels level: accuracy vs the response majority, the human noise ceiling and entropy-RT correlations.

  Returns (report entries, correctness by task, {model: {entropy, log_rt, level}} for the entropy-RT plot).
  """
  report: dict[str, Any] = {}
  if levels_urls:
    from alignet_data.evaluation import levels as levels_lib
    data = levels_lib.load(list(levels_urls))
    choices, level, rt = data.choices, data.level, data.rt
    names, local = np.unique(data.images, return_inverse=True)
    local = local.reshape(data.images.shape)
    get = lambda s: s.by_name(levels_split, names)
    report["levels_data"] = data.summary()
  elif world is not None:
    choices, level, rt = world.levels_choices, world.levels_level, world.levels_rt
    ids, local = np.unique(world.levels_triplets, return_inverse=True)
    local = local.reshape(world.levels_triplets.shape)
    get = lambda s: s.pool()[ids]
  else:
    return {}, {}, {}
  human = metrics.levels_human(choices, level, rt, max_rt=max_rt, **boot)
  out: dict[str, Any] = {}
  correct: dict[str, Any] = {}
  rts: dict[str, Any] = {}
  majority = metrics.majority_vote(choices)
  log_rt = metrics.mean_log_rt(rt, max_rt)
  for name, s in subjects.items():
    x = _try(skipped, f"levels/{name}", lambda s=s: get(s))
    if x is None:
      continue
    sims = triplet_math.triplet_similarities(np.asarray(x, np.float64), local)
    out[name] = metrics.levels_model(sims, choices, level, rt, entropy_tau=entropy_tau, max_rt=max_rt, **boot)
    hit = triplet_math.odd_one_out_correct(sims, majority)
    hit[majority < 0] = np.nan
    for lv in metrics._levels_present(np.asarray(level)):
      correct.setdefault(f"levels/{lv}", {})[name] = np.where(np.asarray(level) == lv, hit, np.nan)
    rts[name] = {"entropy": metrics.model_entropy(sims, entropy_tau), "log_rt": log_rt, "level": np.asarray(level)}
  if not out:
    return report, correct, rts
  report["levels"] = out  # levels[model][level] = {accuracy, ci, n, n_no_majority, entropy_rt_spearman}
  report["human"] = human  # human[level] = {noise_ceiling: {value, ci, n}, n_triplets, n_no_majority, mean_log_rt}
  report["accuracy"] = {name: metrics.flat_accuracies(r) for name, r in out.items()}
  report["noise_ceiling"] = {lv: row["noise_ceiling"]["value"] for lv, row in human.items()}
  report["entropy_rt_spearman"] = {name: {lv: row["entropy_rt_spearman"]["value"] for lv, row in r.items()
                                          if "entropy_rt_spearman" in row} for name, r in out.items()}
  report["majority_ties"] = ("triplets whose responses have no unique majority are excluded from accuracy "
                             "(counted in n_no_majority)")
  return report, correct, rts


def rsa(subjects: Subjects, datasets: Sequence[dict[str, Any]], *, levels_split: str, boot: dict[str, Any],
        skipped: list[str]) -> dict[str, Any]:
  """Model RSMs (Pearson-kernel and cosine) vs each human RSM/RDM dataset ({"name", "matrix", "stimuli", ...})."""
  from alignet_data.evaluation import rsa as rsa_lib
  out: dict[str, Any] = {}
  for entry in datasets:
    human = rsa_lib.load_human(entry["matrix"], entry["stimuli"], entry.get("kind", "rsm"))
    split = entry.get("split", levels_split)
    rows = {}
    for name, s in subjects.items():
      x = _try(skipped, f"rsa/{entry['name']}/{name}",
               lambda s=s, split=split, human=human: s.by_name(split, human.stimuli))
      if x is not None:
        rows[name] = rsa_lib.rsa(x, human, n_resamples=boot["n_resamples"], seed=boot["seed"])
    out[entry["name"]] = {"kind": human.kind, "stimuli": len(human.stimuli), "models": rows}
  # rsa[dataset]["models"][model][kernel][spearman|pearson] = {value, ci, n}
  return {"rsa": out} if out else {}


def probe(subjects: Subjects, world: Any, cfg: dict[str, Any], *, seed: int, skipped: list[str]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """k-shot linear probes (cfg: shots, repeats, probe, l2, split) on a labelled split or the world's pool."""
  from alignet_data.evaluation import probing
  if not cfg["shots"] or (world is None and not cfg["split"]):
    return {}, {}
  out, correct = {}, {}
  for name, s in subjects.items():
    data = _try(skipped, f"probe/{name}", lambda s=s: s.labelled(cfg["split"]))
    if data is None:
      continue
    x, labels = data
    out[name] = probing.few_shot(x, labels, cfg["shots"], repeats=int(cfg["repeats"]), seed=seed,
                                 probe=cfg["probe"], l2=cfg["l2"])
    for k in cfg["shots"]:
      correct.setdefault(f"probe/{k}shot", {})[name] = probing.correct_vector(
          x, labels, int(k), seed=seed, probe=cfg["probe"], l2=cfg["l2"])
  # probe[model][f"{k}shot"] = {accuracy, ci (Wald), n, ...}
  return ({"probe": out} if out else {}), correct


def hierarchy(subjects: Subjects, world: Any, *, base: str, aligned: str, max_items: int, seed: int,
              boot: dict[str, Any], skipped: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Change of pairwise distances per relation in the world's tree from model `base` to `aligned`.

  Returns (report entries, the 2-D PCA of both for `report.plot_pca`, or None when not measured).
  """
  from alignet_data.evaluation import representation
  if world is None or base not in subjects or aligned not in subjects:
    return {}, None
  idx = representation.subsample(len(world.pool_images), int(max_items), seed)
  xs = {}
  for role, name in (("base", base), ("aligned", aligned)):
    x = _try(skipped, f"hierarchy/{name}", lambda name=name: subjects[name].pool())
    if x is None:
      return {}, None
    xs[role] = np.asarray(x, np.float64)[idx]
  sub = np.asarray(world.pool_concepts)[idx]
  basic = np.asarray(world.concept_basic)[sub]
  sup = np.asarray(world.concept_super)[sub]
  change = representation.distance_change(xs["base"], xs["aligned"], sub, basic, sup,
                                          n_resamples=boot["n_resamples"], seed=boot["seed"])
  pca: dict[str, Any] = {"superordinate": sup, "base_name": base, "aligned_name": aligned}
  variance = {}
  for role in ("base", "aligned"):
    pca[role], ratio = representation.pca_2d(xs[role])
    variance[role] = pca[f"{role}_variance"] = [float(v) for v in ratio]
  return {"hierarchy": {"base": base, "aligned": aligned, "images": int(len(idx)), "distance_change": change,
                        "pca_explained_variance": variance}}, pca


def comparisons(primary: str, correct: dict[str, dict[str, np.ndarray]], boot: dict[str, Any],
                objects: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Every other model minus the primary one, per task, on the same items (paired bootstrap; McNemar); a task
  with THINGS object ids in `objects` gets the paired object bootstrap too."""
  out: dict[str, Any] = {}
  for task, by_model in correct.items():
    if primary not in by_model:
      continue
    for name, values in by_model.items():
      if name != primary:
        out.setdefault(f"{name}_vs_{primary}", {})[task] = metrics.paired_comparison(
            values, by_model[primary], objects=(objects or {}).get(task), **boot)
  return out
