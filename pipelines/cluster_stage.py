"""Stage `cluster`: k-means (faiss) of the transformed teacher embeddings, k picked by the elbow criterion.

  alignet cluster --embeddings E --transform T --out C            # elbow over k_grid
  alignet cluster --embeddings E --transform T --k 500 --out C    # fixed k (the paper's c = 500)

Writes ``clusters.npz`` (ids, cluster, centroids), ``elbow.json`` and ``elbow.png``; the report holds ``k``,
``inertia`` (of the chosen k) and ``elbow`` (inertia per k of the grid).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, checks
from alignet_data.dataset import clustering
from alignet_data.teacher import embeddings
from alignet_data.teacher.transform import Transform
from pipelines import stages

__all__ = ["STAGE", "default_config", "add_arguments", "config_from_args", "input_urls", "run"]

STAGE = "cluster"


def default_config() -> dict[str, Any]:
  return {
      "embeddings": None,        # URL of an embed artifact.
      "split": "pool",           # Which of its splits to cluster.
      "transform": None,         # URL of an align artifact (or transform .npz); None clusters raw embeddings.
      "k": None,                 # Fix the number of clusters; None picks it by the elbow over k_grid.
      "k_grid": [5, 10, 15, 20, 25, 30, 40, 50, 60, 80],
      "seed": 0,
      "niter": 20,
      "nredo": 1,                # k-means restarts from fresh k-means++ seedings (the lowest inertia wins).
      "max_points_per_centroid": 256,  # Train on a seeded sample of this many points per centroid (faiss's
                                 # default); 0 trains on every point. Every point is assigned either way.
      "plot": True,
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--embeddings", help="Embed artifact URL.")
  parser.add_argument("--split", help="Embeddings split to cluster (default: pool).")
  parser.add_argument("--transform", help="Align artifact (or transform .npz) URL; omit for raw embeddings.")
  parser.add_argument("--k", type=int, help="Number of clusters (default: elbow criterion over --k-grid).")
  parser.add_argument("--k-grid", help="Comma-separated candidate k for the elbow, e.g. 100,200,500,1000.")
  parser.add_argument("--seed", type=int, help="k-means seed.")
  parser.add_argument("--niter", type=int, help="k-means iterations.")
  parser.add_argument("--nredo", type=int, help="k-means restarts; the lowest inertia wins (default 1).")
  parser.add_argument("--max-points-per-centroid", type=int,
                      help="Train on a seeded sample of at most this many points per centroid (default 256, as "
                           "faiss); 0 trains on every point. Every point is assigned.")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
  config = stages.apply_flags(default_config(), args)
  if isinstance(config["k_grid"], str):
    config["k_grid"] = [int(v) for v in config["k_grid"].split(",") if v.strip()]
  return config


def input_urls(config: dict[str, Any]) -> dict[str, str]:
  checks.require_min(config, STAGE, k=1, niter=1, nredo=1, max_points_per_centroid=0, seed=0)
  for k in config["k_grid"] or []:
    checks.require_min({"k_grid": k}, STAGE, k_grid=2)
  urls = {"embeddings": _required(config, "embeddings")}
  if config.get("transform"):
    urls["transform"] = config["transform"]
  return urls


def _required(config: dict[str, Any], key: str) -> str:
  if not config.get(key):
    raise ValueError(f"The {STAGE} stage needs `{key}` (--{key.replace('_', '-')} URL).")
  return config[key]


def run(config: dict[str, Any], writer: artifacts.ArtifactWriter, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """Streams the embeddings twice (the training samples, then every point's assignment): the matrix is never held
  or transformed whole (`clustering.cluster`). NaN/inf in the inputs, or a transform that overflows them, is
  refused with a clear error (the readers check; so do the transform and the assignment)."""
  url, split = _required(config, "embeddings"), config["split"]
  ids, dim = embeddings.read_ids(url, split)
  if len(ids) == 0:
    raise ValueError(f"Embeddings {url} split {split!r} is empty.")
  transform = Transform.load(config["transform"]) if config.get("transform") else None
  what = f"Embeddings {url} split {split!r}" + (f" after transform {config['transform']}" if transform else "")
  result = clustering.cluster(None, ids, k=config["k"], k_grid=config["k_grid"], seed=config["seed"],
                              niter=config["niter"], nredo=config["nredo"],
                              max_points_per_centroid=config["max_points_per_centroid"], transform=transform,
                              blocks=lambda: clustering.prefetch(embeddings.iter_vectors(url, split)), dim=dim,
                              what=what, progress=True)
  clustering.save(writer, result.clusters)
  elbow = {"k": result.k_grid, "inertia": result.inertias, "chosen": result.clusters.k,
           "chosen_by": result.chosen_by}
  writer.write_json("elbow.json", elbow)
  if config["plot"] and result.k_grid:
    with writer.open("elbow.png", "wb") as f:
      clustering.plot_elbow(result.k_grid, result.inertias, result.clusters.k, f)
  sizes = np.bincount(result.clusters.cluster, minlength=result.clusters.k)
  return {
      "k": result.clusters.k,
      "chosen_by": result.chosen_by,
      "inertia": result.inertia,
      "elbow": {"k": result.k_grid, "inertia": result.inertias},
      "points": len(ids),
      "dim": int(result.clusters.centroids.shape[1]),
      "transformed": bool(config.get("transform")),
      "cluster_size_min": int(sizes.min()),
      "cluster_size_max": int(sizes.max()),
      "singleton_clusters": int((sizes == 1).sum()),
      "empty_clusters": int((sizes == 0).sum()),
  }
