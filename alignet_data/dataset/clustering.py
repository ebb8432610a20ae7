"""k-means clusters of (transformed) teacher embeddings, for cluster-boundary sampling.

The paper clusters the transformed ImageNet representations into c clusters (c = 500, chosen by the elbow
criterion) and samples triplets with two images from one cluster and one from another. Here: seeded faiss
k-means with k-means++ seeding (trained on a seeded sample of 256 points per centroid by default, as faiss
does; on every point when asked), every point assigned to its nearest centroid, inertia (sum of squared distances
over ALL points) per candidate k, and the knee of the inertia curve as the elbow choice. Only the training samples
are transformed: the assignment works on the raw vectors (`assign_all`), so the stage streams the matrix and never
holds it.

Stored as ``clusters.npz``: ``ids`` (n,) int64 (the embedding ids), ``cluster`` (n,) int64, ``centroids``
(k, d) float32.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from alignet_data import artifacts, checks, numeric_files

FILE_NAME = "clusters.npz"
_ASSIGN_BLOCK = 1 << 16
SEED_POINTS = 1 << 14  # k-means++ seeds from at most this many of the training points (see `kmeans`).
_SCORE_ROWS = 4096  # Rows per BLAS call in `assign_all`: fixed, so the bits do not depend on threads.
_TRANSFORM_ROWS = 1024  # Rows per BLAS call in `transform_rows`: fixed, so the bits do not depend on threads.
_SMALL_WORK = 1 << 29  # n * k * d below this: one faiss thread (see `_faiss_threads`).


@contextlib.contextmanager
def _faiss_threads(work: int):
  """One OpenMP thread for small problems: on a busy machine, faiss's spinning threads made a 3000 x 64, k = 20
  fit take 0.9 s instead of 3 ms (measured on 2 shared cores)."""
  import faiss
  before = faiss.omp_get_max_threads()
  if work < _SMALL_WORK:
    faiss.omp_set_num_threads(1)
  try:
    yield
  finally:
    faiss.omp_set_num_threads(before)


@dataclasses.dataclass(frozen=True)
class Clusters:
  ids: np.ndarray        # (n,) int64 embedding ids, sorted like the embeddings.
  cluster: np.ndarray    # (n,) int64 cluster of each id.
  centroids: np.ndarray  # (k, d) float32.

  @property
  def k(self) -> int:
    return int(self.centroids.shape[0])

  def for_ids(self, ids: np.ndarray) -> np.ndarray:
    """Cluster of each given id; fails clearly if the clusters were made from other embeddings."""
    ids = np.asarray(ids)
    if ids.shape == self.ids.shape and np.array_equal(ids, self.ids):
      return self.cluster
    pos = np.searchsorted(self.ids, ids)
    ok = (pos < self.ids.size) & (self.ids[np.minimum(pos, self.ids.size - 1)] == ids)
    if not ok.all():
      raise ValueError(f"{int((~ok).sum())} embedding ids (e.g. {ids[~ok][:3].tolist()}) have no cluster: the "
                       "clusters artifact was made from other embeddings; rerun `alignet cluster` on them.")
    return self.cluster[pos]


def _dots(x: np.ndarray, c: np.ndarray) -> np.ndarray:
  """x @ c.T in float64; small products skip BLAS, whose idle threads cost 20x on a busy machine (measured)."""
  if x.shape[0] * x.shape[1] * c.shape[0] < _SMALL_WORK // 32:
    return np.einsum("nd,td->nt", x, c, dtype=np.float64)
  return (x @ c.T).astype(np.float64)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """Greedy k-means++ seeding (as scikit-learn): each step keeps the best of 2 + log k D^2-sampled candidates.

  faiss seeds with k random points, which on well-separated data often merges two true clusters and splits
  another (a local minimum no amount of Lloyd iterations leaves); k-means++ avoids most of these.
  """
  x = np.asarray(x, dtype=np.float32)
  n = len(x)
  trials = 2 + int(np.log(k))
  sq = np.einsum("nd,nd->n", x, x, dtype=np.float64)
  centers = np.empty((k, x.shape[1]), np.float32)
  first = int(rng.integers(n))
  centers[0] = x[first]
  closest = np.maximum(sq - 2.0 * _dots(x, x[first:first + 1])[:, 0] + sq[first], 0.0)
  for i in range(1, k):
    total = closest.sum()
    if total <= 0:  # Fewer distinct points than k: repeat one (faiss then splits empty clusters).
      centers[i:] = x[int(rng.integers(n))]
      break
    cand = np.minimum(np.searchsorted(np.cumsum(closest), rng.random(trials) * total), n - 1)
    d = np.maximum(sq[:, None] - 2.0 * _dots(x, x[cand]) + sq[cand][None], 0.0)  # (n, trials)
    new = np.minimum(closest[:, None], d)
    best = int(np.argmin(new.sum(0)))
    centers[i] = x[cand[best]]
    closest = new[:, best]
  return centers


def training_rows(n: int, k: int, max_points_per_centroid: int | None, rng: np.random.Generator) -> np.ndarray | None:
  """Sorted rows of the seeded training sample for k clusters (None: all n), as faiss samples."""
  if max_points_per_centroid and n > k * max_points_per_centroid:
    return np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))
  return None


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, niter: int = 20, nredo: int = 1,
           max_points_per_centroid: int | None = None, init: str = "kmeans++") -> np.ndarray:
  """Seeded faiss k-means; returns (k, d) float32 centroids.

  Trains on at most `max_points_per_centroid` * k points (a seeded sample, as faiss does: 256 per centroid is
  the stage's default; a centroid is then fitted to 256 points, plenty for a mean); None or 0 trains on all points.
  `init` "kmeans++" seeds from the training points (`kmeans_plus_plus`, on a seeded subsample of at most
  `SEED_POINTS` of them: its k greedy steps each read every point, memory-bound: on 65,536 x 1152 with k = 500
  seeding took 2-3x as long as 20 Lloyd iterations on 128,000 points; 16,384 points still give 32 per centroid);
  "random" is faiss's own. `nredo` restarts from fresh seedings and keeps the lowest objective.
  """
  x = np.ascontiguousarray(x, dtype=np.float32)
  n = len(x)
  _check_k(k, n)
  rng = np.random.default_rng([seed, k])
  rows = training_rows(n, k, max_points_per_centroid, rng)
  return fit_kmeans(x if rows is None else x[rows], k, rng, seed=seed, niter=niter, nredo=nredo, init=init)


def _check_k(k: int, n: int) -> None:
  if not 1 <= k <= n:
    raise ValueError(f"k = {k} clusters needs 1 <= k <= number of points ({n}); pass a smaller --k.")


def fit_kmeans(train: np.ndarray, k: int, rng: np.random.Generator, *, seed: int = 0, niter: int = 20,
               nredo: int = 1, init: str = "kmeans++") -> np.ndarray:
  """faiss k-means on exactly the rows `train` (already sampled; `rng` continues the sampling's stream)."""
  import faiss
  if init not in ("kmeans++", "random"):
    raise ValueError(f"Unknown k-means init {init!r}; use 'kmeans++' or 'random'.")
  train = np.ascontiguousarray(train, dtype=np.float32)
  _check_k(k, len(train))
  d = train.shape[1]
  best, best_obj = None, np.inf
  for redo in range(max(int(nredo), 1)):  # Restarts from fresh seedings; the lowest objective wins.
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed) + redo, verbose=False,
                      max_points_per_centroid=len(train) // k + 1, min_points_per_centroid=1)
    seeds = None
    if init == "kmeans++":
      pool = train if len(train) <= max(SEED_POINTS, k) else train[np.sort(rng.choice(len(train), SEED_POINTS,
                                                                                      replace=False))]
      seeds = kmeans_plus_plus(pool, k, rng)
    with _faiss_threads(len(train) * k * d):
      obj = km.train(train, init_centroids=seeds)
    if best is None or obj < best_obj:
      best, best_obj = np.asarray(km.centroids, dtype=np.float32).reshape(k, d), obj
  return best


def assign(x: np.ndarray, centroids: np.ndarray, block: int = _ASSIGN_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """Nearest centroid (int64) and squared distance (float32) per point, in blocks to bound memory."""
  import faiss
  centroids = np.ascontiguousarray(centroids, dtype=np.float32)
  index = faiss.IndexFlatL2(centroids.shape[1])
  index.add(centroids)
  labels = np.empty(len(x), np.int64)
  dists = np.empty(len(x), np.float32)
  with _faiss_threads(len(x) * len(centroids) * centroids.shape[1]):
    for s in range(0, len(x), block):
      d, i = index.search(np.ascontiguousarray(x[s:s + block], dtype=np.float32), 1)
      labels[s:s + block], dists[s:s + block] = i[:, 0], d[:, 0]
  return labels, dists


def transform_rows(transform, x: np.ndarray, what: str = "transformed embeddings", threads: int | None = None,
                   in_place: bool = False) -> np.ndarray:
  """`transform.apply(x)` into one float32 array, bit-identical whatever the BLAS thread count.

  OpenBLAS rounds a product differently with one thread than with several, and differently per row-block shape, so
  a Dask worker (its nanny pins BLAS to one thread) and the launcher disagreed in the last bit. Here every fixed
  block of `_TRANSFORM_ROWS` rows is one single-threaded BLAS call, and our own thread pool runs the blocks: the bits
  depend on the rows only (on a given CPU family and BLAS build), and the speed is the threaded product's (measured:
  200k x 1152 in 2.5 s on 2 cores, against 2.8-3.1 s for 65,536-row threaded calls). The peak is one output matrix.

  Each block is checked for NaN/inf while in cache (finite inputs can still overflow float32), so k-means and
  the labelling never see one; `what` names the inputs in the InputError. `in_place` overwrites `x` with the
  result when it can hold it (writable float32, square transform): the peak is then the one matrix (ImageNet:
  5.9 GB, not 11.8); each block is read whole before it is written, so this is safe.
  """
  import threadpoolctl

  shape = (len(x), transform.weights.shape[1])
  reuse = in_place and x.dtype == np.float32 and x.shape == shape and x.flags.writeable and x.flags.c_contiguous
  out = x if reuse else np.empty(shape, np.float32)

  def block(s: int) -> None:
    with np.errstate(over="ignore", invalid="ignore"):  # Checked just below, with a message naming the inputs.
      out[s:s + _TRANSFORM_ROWS] = transform.apply(x[s:s + _TRANSFORM_ROWS])
    checks.require_finite(out[s:s + _TRANSFORM_ROWS], f"{what} (rows from {s})", _TRANSFORM_ROWS)

  starts = range(0, len(x), _TRANSFORM_ROWS)
  threads = min(threads or len(os.sched_getaffinity(0)), max(len(starts), 1))
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    if threads <= 1:
      for s in starts:
        block(s)
    else:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(block, starts):  # In order: the first bad block is the one reported.
          pass
  return out


def elbow(ks: Sequence[int], inertias: Sequence[float]) -> int:
  """The knee of a decreasing inertia curve: the k farthest below the chord from the first to the last point.

  Both axes are scaled to [0, 1] first (the "kneedle" rule), so the choice does not depend on units.
  """
  ks = np.asarray(ks, dtype=np.float64)
  y = np.asarray(inertias, dtype=np.float64)
  if ks.size == 0:
    raise ValueError("elbow() needs at least one k.")
  if ks.size < 3:  # No knee on one or two points: take the largest k tried.
    return int(ks[-1])
  x = (ks - ks[0]) / (ks[-1] - ks[0])
  span = y[0] - y[-1]
  yn = (y - y[-1]) / span if span > 0 else np.zeros_like(y)
  gap = (1.0 - x) - yn  # Chord from (0, 1) to (1, 0) minus the curve.
  return int(ks[int(np.argmax(gap))])


@dataclasses.dataclass(frozen=True)
class ClusterResult:
  clusters: Clusters
  k_grid: list[int]
  inertias: list[float]   # Over all points, per k in k_grid (empty when k was fixed).
  chosen_by: str          # "elbow" or "fixed".
  inertia: float          # Of the chosen k.


Blocks = Callable[[], Iterator[np.ndarray]]  # Each call: every row again, in order, as (m, d) float32 blocks.


def array_blocks(x: np.ndarray, rows: int = 1 << 16) -> Blocks:
  """An in-memory matrix as a `Blocks` source."""
  return lambda: (x[s:s + rows] for s in range(0, len(x), rows))


def prefetch(blocks: Iterator[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
  """The same blocks, read ahead by a background thread (reading releases the GIL), so reading overlaps the
  compute on the previous block; an error in the reader is raised here."""
  import queue
  import threading
  q: queue.Queue = queue.Queue(depth)
  done = object()
  stop = threading.Event()

  def read() -> None:
    try:
      for block in blocks:
        while not stop.is_set():
          try:
            q.put(block, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(done)
    except BaseException as e:  # Handed to the consumer, which re-raises it.
      q.put(e)

  thread = threading.Thread(target=read, daemon=True)
  thread.start()
  try:
    while (item := q.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def _gather(blocks: Blocks, rows: np.ndarray, n: int, d: int) -> np.ndarray:
  """The given sorted rows of a `Blocks` source, in one pass."""
  out = np.empty((len(rows), d), np.float32)
  start = 0
  for block in blocks():
    lo, hi = np.searchsorted(rows, [start, start + len(block)])
    out[lo:hi] = block[rows[lo:hi] - start]
    start += len(block)
  if start != n:
    raise ValueError(f"The features hold {start} rows, the ids {n}.")
  return out


def _affine(transform) -> tuple[np.ndarray, np.ndarray] | None:
  """(a, b) in float64 with `transform.apply(x)` == x @ a + b (mean and std folded in); None for no transform."""
  if transform is None:
    return None
  a = np.asarray(transform.weights, np.float64) / float(transform.std)
  return a, np.asarray(transform.bias, np.float64) - float(transform.mean) * a.sum(0)


def _fixed_chunks(blocks: Iterator[np.ndarray], rows: int) -> Iterator[list[np.ndarray]]:
  """Re-cut a stream of blocks into consecutive float32 chunks of exactly `rows` rows (the last may be shorter),
  one list per block read: the chunks, hence the sums, do not depend on how the source is sharded. Only the rows
  of a chunk that straddles two blocks are copied."""
  pending = None
  for block in blocks:
    block = np.ascontiguousarray(block, np.float32)
    out, s = [], 0
    if pending is not None:
      s = min(rows - len(pending), len(block))
      pending = np.concatenate([pending, block[:s]])
      if len(pending) == rows:
        out.append(pending)
        pending = None
    while len(block) - s >= rows:
      out.append(block[s:s + rows])
      s += rows
    if s < len(block):
      pending = block[s:].copy()
    yield out
  if pending is not None:
    yield [pending]


def assign_all(blocks: Blocks, n: int, centroids: Sequence[np.ndarray], transform=None, *, threads: int | None = None,
               what: str = "features", bar=None) -> tuple[list[np.ndarray], list[float]]:
  """Nearest centroid of every row for each centroid set, and each set's inertia, in ONE pass over raw rows.

  The centroids live in the transformed space x' = x a + b. As ||x' - c||^2 = ||x'||^2 + (||c||^2 - 2 b.c) - 2 x.(a c),
  the nearest centroid needs x @ (a C^T): k columns per row instead of the transform's d, so the matrix is never
  transformed (ImageNet: 1.5 TFLOP for c = 500 instead of 3.4 + 1.5). The inertia's sum of ||x'||^2 comes from the
  Gram matrix X^T X (half the transform's FLOPs). Fixed `_SCORE_ROWS`-row BLAS calls, one thread each, on our own
  pool: the bits do not depend on the thread count (see `transform_rows`).
  """
  import threadpoolctl
  affine = _affine(transform)
  d = transform.in_dim if transform is not None else centroids[0].shape[1]
  scores = []
  for c in centroids:
    c = np.asarray(c, np.float64)
    a, b = affine if affine is not None else (None, np.zeros(c.shape[1]))
    q = -2.0 * (c.T if a is None else a @ c.T)
    scores.append((np.ascontiguousarray(q, np.float32), ((c * c).sum(1) - 2.0 * (c @ b)).astype(np.float32)))
  labels = [np.empty(n, np.int64) for _ in centroids]
  mins = [0.0] * len(centroids)
  gram, colsum, sq = np.zeros((d, d)), np.zeros(d), 0.0

  def part(xs: np.ndarray) -> tuple[list[np.ndarray], list[float], Any]:
    out_l, out_m = [], []
    for q, e in scores:
      sc = xs @ q
      sc += e
      lab = np.argmin(sc, axis=1)
      out_l.append(lab)
      out_m.append(float(sc[np.arange(len(xs)), lab].sum(dtype=np.float64)))
    norms = (xs.T @ xs, xs.sum(0, dtype=np.float64)) if affine is not None else np.einsum(
        "nd,nd->", xs, xs, dtype=np.float64)
    return out_l, out_m, norms

  threads = threads or len(os.sched_getaffinity(0))
  start = 0
  with threadpoolctl.threadpool_limits(1, user_api="blas"), concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for parts in _fixed_chunks(blocks(), _SCORE_ROWS):
      for xs, (out_l, out_m, norms) in zip(parts, pool.map(part, parts), strict=True):  # In order: same sums.
        if start + len(xs) > n:
          raise ValueError(f"The features hold more rows than the {n} ids.")
        for g, (lab, m) in enumerate(zip(out_l, out_m, strict=True)):
          labels[g][start:start + len(xs)] = lab
          mins[g] += m
        if affine is not None:
          gram += norms[0]
          colsum += norms[1]
        else:
          sq += norms
        start += len(xs)
      if bar is not None:
        bar.set_postfix_str(f"assigning: {start:,} of {n:,} points")
  if start != n:
    raise ValueError(f"The features hold {start} rows, the ids {n}.")
  if affine is not None:
    a, b = affine
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      sq = float(((gram @ a) * a).sum() + 2.0 * colsum @ (a @ b) + n * (b @ b))
  inertias = [max(sq + m, 0.0) for m in mins]
  if not np.all(np.isfinite(inertias)):
    raise checks.InputError(f"{what}: the squared distances to the centroids overflow (non-finite inertia); the "
                            "features or the transform hold values too large for float32.")
  return labels, inertias


def cluster(x: np.ndarray | None, ids: np.ndarray, *, k: int | None = None, k_grid: Sequence[int] = (),
            seed: int = 0, niter: int = 20, nredo: int = 1, max_points_per_centroid: int | None = None,
            transform=None, blocks: Blocks | None = None, dim: int | None = None, what: str = "features",
            progress: bool = False) -> ClusterResult:
  """Cluster the rows of x (transformed by `transform` when given), a fixed k or the elbow choice over k_grid.

  `blocks` (with `dim`) replaces x: the rows, streamed (the stage reads them from the embeddings artifact block by
  block, so the matrix is never held: ImageNet is 5.9 GB). The work is shared across the candidate k: one pass
  gathers every k's seeded training sample, one transform of the sampled rows (not of every row), one k-means per
  k, then one pass assigns every point for every k (`assign_all`). k values >= n are dropped from the grid.
  """
  n = len(ids)
  if blocks is None:
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks, dim = array_blocks(x), x.shape[1]
  if transform is not None and transform.in_dim != dim:
    raise ValueError(f"Features have dimension {dim}, the transform expects {transform.in_dim}.")
  if k is None:
    grid = sorted({int(g) for g in k_grid if 2 <= int(g) < n})
    if not grid:
      raise ValueError(f"No usable k in k_grid {list(k_grid)} for {n} points (need 2 <= k < n); pass --k.")
  else:
    _check_k(int(k), n)
    grid = []
  candidates = grid or [int(k)]
  from tqdm import tqdm

  with tqdm(total=len(candidates) + 2, desc="k-means elbow" if grid else "k-means", disable=not progress) as bar:
    rngs = {g: np.random.default_rng([seed, g]) for g in candidates}
    rows = {g: training_rows(n, g, max_points_per_centroid, rngs[g]) for g in candidates}
    union = (np.arange(n) if any(r is None for r in rows.values())
             else np.unique(np.concatenate(list(rows.values()))))
    bar.set_postfix_str(f"reading {len(union):,} sampled points")
    train_all = _gather(blocks, union, n, dim)
    if transform is not None:
      train_all = transform_rows(transform, train_all, what=what, in_place=True)
    bar.update()
    centroids = []
    for g in candidates:
      bar.set_postfix_str(f"k={g}: k-means")
      train = train_all if rows[g] is None else train_all[np.searchsorted(union, rows[g])]
      centroids.append(fit_kmeans(train, g, rngs[g], seed=seed, niter=niter, nredo=nredo))
      bar.update()
    del train_all, train
    labels, inertias = assign_all(blocks, n, centroids, transform, what=what, bar=bar)
    bar.update()
  chosen = int(k) if k is not None else elbow(grid, inertias)
  i = candidates.index(chosen)
  return ClusterResult(Clusters(np.asarray(ids, np.int64), labels[i], centroids[i]), grid,
                       inertias if grid else [], "fixed" if k is not None else "elbow", inertias[i])


def save(writer: artifacts.ArtifactWriter, clusters: Clusters, name: str = FILE_NAME) -> None:
  writer.write_npz(name, ids=clusters.ids.astype(np.int64), cluster=clusters.cluster.astype(np.int64),
                   centroids=clusters.centroids.astype(np.float32))
  writer.set_rows(name, len(clusters.ids))


def load(source: str | artifacts.Artifact) -> Clusters:
  """From a cluster artifact (URL or Artifact) or a path/URL of a ``clusters.npz``."""
  what = "clusters .npz (ids, cluster, centroids)"
  if isinstance(source, str) and source.endswith(".npz"):
    data = numeric_files.load_npz(source, what=what)
  else:
    art = source if isinstance(source, artifacts.Artifact) else artifacts.load(source, stage="cluster")
    with art.open(FILE_NAME) as f:
      data = numeric_files.load_npz(f, art.path(FILE_NAME), what=what)
  missing = {"ids", "cluster", "centroids"} - set(data)
  if missing:
    raise ValueError(f"{source}: clusters file lacks arrays {sorted(missing)}.")
  return Clusters(data["ids"].astype(np.int64), data["cluster"].astype(np.int64), data["centroids"])


def plot_elbow(ks: Sequence[int], inertias: Sequence[float], chosen: int, path_or_file) -> None:
  """Inertia vs k with the chosen k marked (PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
  ax.plot(ks, inertias, "o-", color="tab:blue")
  if chosen in ks:
    ax.plot([chosen], [inertias[list(ks).index(chosen)]], "o", ms=12, mfc="none", color="tab:red")
  ax.axvline(chosen, color="tab:red", lw=0.8, ls="--", label=f"chosen k = {chosen}")
  ax.set_xlabel("number of clusters k")
  ax.set_ylabel("inertia (sum of squared distances)")
  ax.set_title("k-means elbow")
  ax.legend(frameon=False)
  fig.tight_layout()
  fig.savefig(path_or_file, format="png", metadata={"Software": None})
  plt.close(fig)
