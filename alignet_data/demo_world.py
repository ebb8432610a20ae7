"""The demo world: a seeded, procedurally generated stand-in for THINGS, ImageNet and Levels.

No real weights or images can be fetched offline, so the embedded default runs on this world, which keeps what
matters about the real problem (DESIGN.md, "The embedded default"):

* concepts in a 3-level hierarchy (superordinate > basic > subordinate); superordinates fall into two domains
  (think living / non-living), so even across superordinates human similarity has structure;
* images (32x32 RGB) whose SHAPE is set by the basic category (refined per subordinate) but whose COLOUR
  PALETTE and background are shared across superordinates: palette ``(s + b) % n_palettes`` gives every
  superordinate every palette. A model trained on basic-level labels therefore groups classes by appearance,
  not by superordinate: it is misaligned at the coarse level (the paper's lizards-and-plants example);
* a simulated human population judging odd-one-out triplets from a hidden semantic embedding (hierarchical,
  plus a little appearance), with per-participant noise: a THINGS-like set (one image per concept, train/test
  triplets with one response each) and a Levels-like set on the ImageNet-like pool (coarse, fine and
  class-boundary triplets, 5 responses each, response times that grow with the participants' uncertainty).

Everything is a pure function of `WorldConfig`; each part draws from its own seeded stream.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from alignet_data import artifacts, triplet_math

FILE_NAME = "world.npz"
LEVELS = ("coarse", "fine", "boundary")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  seed: int = 0
  n_super: int = 5
  n_basic_per_super: int = 4
  n_sub_per_basic: int = 4
  n_palettes: int = 4
  images_per_class: int = 150
  image_size: int = 32
  human_dim: int = 32
  human_beta: float = 2.5  # Inverse temperature of the simulated participants' choices.
  # Weights of the basic and subordinate parts of the hidden human embedding (the superordinate part has 1 plus a
  # shared domain): large enough that participants tell basic categories and subordinates apart, as Levels'
  # noise ceilings show people do (paper: coarse 62%, fine 66%, boundary 89%).
  human_basic_weight: float = 1.0
  human_sub_weight: float = 0.8
  things_train: int = 20000
  things_test: int = 4000
  levels_per_level: int = 300
  levels_responses: int = 5


@dataclasses.dataclass
class World:
  config: dict[str, Any]
  n_super: int
  n_basic: int
  concept_ids: np.ndarray
  concept_super: np.ndarray
  concept_basic: np.ndarray
  human_embedding: np.ndarray
  things_images: np.ndarray
  things_train: np.ndarray
  things_test: np.ndarray
  things_train_probs: np.ndarray
  things_test_probs: np.ndarray
  pool_images: np.ndarray
  pool_labels: np.ndarray
  pool_super: np.ndarray
  pool_concepts: np.ndarray
  pool_file_names: np.ndarray
  levels_triplets: np.ndarray
  levels_level: np.ndarray
  levels_choices: np.ndarray
  levels_rt: np.ndarray

  @property
  def basic_super(self) -> np.ndarray:
    """Superordinate of each basic category (class)."""
    return np.arange(self.n_basic) // (self.n_basic // self.n_super)


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream])


# ----------------------------------------------------------------------------------------------------------------
# Hierarchy and the hidden human embedding.


def _hierarchy(cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
  n_basic = cfg.n_super * cfg.n_basic_per_super
  concept_basic = np.repeat(np.arange(n_basic), cfg.n_sub_per_basic)
  return concept_basic // cfg.n_basic_per_super, concept_basic


def _human_embedding(cfg: WorldConfig, concept_super: np.ndarray, concept_basic: np.ndarray) -> np.ndarray:
  """Hierarchical semantic vectors: domain + superordinate + basic + subordinate (weights in `WorldConfig`)."""
  rng = _rng(cfg.seed, 1)
  d = cfg.human_dim
  unit = lambda n: rng.normal(size=(n, d)) / np.sqrt(d)
  domain = unit(2)
  sup = 0.8 * domain[np.arange(cfg.n_super) % 2] + 1.0 * unit(cfg.n_super)
  basic = unit(cfg.n_super * cfg.n_basic_per_super)
  sub = unit(len(concept_basic))
  return (sup[concept_super] + cfg.human_basic_weight * basic[concept_basic]
          + cfg.human_sub_weight * sub).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Rendering.


def _palettes(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Foreground and background colours per palette, spread around the hue circle."""
  hues = np.arange(n) / n
  fg = np.stack([0.5 + 0.45 * np.cos(2 * np.pi * (hues + k / 3)) for k in range(3)], -1)
  bg = np.stack([0.5 + 0.3 * np.cos(2 * np.pi * (hues + 0.5 + k / 3)) for k in range(3)], -1)
  return fg.astype(np.float32), bg.astype(np.float32)


def _blob_mask(centres: np.ndarray, radii: np.ndarray, size: int) -> np.ndarray:
  """Soft union of Gaussian blobs on a size x size grid, in [0, 1]."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
  field = np.exp(-d2 / (2 * radii[:, None, None] ** 2)).sum(0)
  return np.clip(1.6 * field - 0.45, 0.0, 1.0)


def _templates(cfg: WorldConfig, concept_basic: np.ndarray) -> np.ndarray:
  """(C, S, S) shape mask per concept: a class shape, refined by a subordinate-specific blob."""
  rng = _rng(cfg.seed, 2)
  n_basic = cfg.n_super * cfg.n_basic_per_super
  size = cfg.image_size
  shapes = []
  for _ in range(n_basic):
    k = rng.integers(2, 5)
    shapes.append((rng.uniform(0.3, 0.7, (k, 2)), rng.uniform(0.07, 0.16, k)))
  masks = np.empty((len(concept_basic), size, size), np.float32)
  for c, b in enumerate(concept_basic):
    centres, radii = shapes[b]
    extra_c = rng.uniform(0.25, 0.75, (1, 2))
    extra_r = rng.uniform(0.05, 0.08, 1)
    masks[c] = _blob_mask(np.concatenate([centres, extra_c]), np.concatenate([radii, extra_r]), size)
  return masks


def _stripes(cfg: WorldConfig, n_concepts: int) -> np.ndarray:
  """(C, S, S) subordinate texture: oriented stripes of a concept-specific frequency."""
  rng = _rng(cfg.seed, 3)
  yy, xx = np.mgrid[0:cfg.image_size, 0:cfg.image_size].astype(np.float32)
  angle = rng.uniform(0, np.pi, n_concepts)[:, None, None]
  freq = rng.uniform(0.25, 0.9, n_concepts)[:, None, None]
  return 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))


def render(cfg: WorldConfig, concepts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Render one image per entry of `concepts` (instance noise from `rng`); uint8 (n, S, S, 3)."""
  concept_super, concept_basic = _hierarchy(cfg)
  masks = _templates(cfg, concept_basic)
  stripes = _stripes(cfg, len(concept_basic))
  fg, bg = _palettes(cfg.n_palettes)
  n, size = len(concepts), cfg.image_size
  palette = (concept_super + concept_basic % cfg.n_basic_per_super)[concepts] % cfg.n_palettes
  shift = rng.integers(-4, 5, (n, 2))
  fg_c = np.clip(fg[palette] + rng.normal(0, 0.06, (n, 3)), 0, 1)
  bg_c = np.clip(bg[palette] + rng.normal(0, 0.06, (n, 3)), 0, 1)
  gradient = np.linspace(-0.12, 0.12, size, dtype=np.float32)
  images = np.empty((n, size, size, 3), np.float32)
  for i, c in enumerate(concepts):
    m = np.roll(masks[c], tuple(shift[i]), axis=(0, 1))[..., None]
    tex = np.roll(stripes[c], tuple(shift[i]), axis=(0, 1))[..., None]
    back = bg_c[i] + gradient[:, None, None] * (1 if i % 2 else -1)
    front = fg_c[i] * (0.75 + 0.25 * tex)
    images[i] = m * front + (1 - m) * back
  images += rng.normal(0, 0.04, images.shape).astype(np.float32)
  return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Simulated humans.


def _choose(sims: np.ndarray, beta: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Sample each participant's most similar pair from softmax(beta * sims); (pair index, probabilities)."""
  p = triplet_math.pair_probabilities(beta[..., None] * sims)
  u = rng.random(p.shape[:-1])[..., None]
  pair = (u > np.cumsum(p, axis=-1)).sum(-1).clip(0, 2)
  return pair, p


def _distinct_triplets(rng: np.random.Generator, n_items: int, n: int) -> np.ndarray:
  """n distinct unordered triplets of distinct items (rows sorted), in random order."""
  seen: set[tuple[int, int, int]] = set()
  out = []
  while len(out) < n:
    cand = np.sort(np.stack([rng.choice(n_items, 3, replace=False) for _ in range(min(4 * n, 50000))]), axis=1)
    for t in map(tuple, cand):
      if t not in seen:
        seen.add(t)
        out.append(t)
        if len(out) == n:
          break
  return np.asarray(out, np.int64)


def _things_triplets(cfg: WorldConfig, emb: np.ndarray) -> tuple[np.ndarray, ...]:
  """THINGS-like train/test: distinct concept triplets, one simulated response each, as (i, j, odd)."""
  rng = _rng(cfg.seed, 4)
  n_total = cfg.things_train + cfg.things_test
  max_distinct = len(emb) * (len(emb) - 1) * (len(emb) - 2) // 6
  if n_total > max_distinct:
    raise ValueError(f"Asked for {n_total} THINGS-like triplets; only {max_distinct} distinct ones exist.")
  trip = _distinct_triplets(rng, len(emb), n_total)
  sims = triplet_math.triplet_similarities(emb, trip)
  beta = cfg.human_beta * np.exp(rng.normal(0, 0.25, len(trip)))
  pair, probs = _choose(sims, beta, rng)
  pairs = triplet_math.PAIRS[pair]
  odd = triplet_math.ODD_OF_PAIR[pair]
  rows = np.arange(len(trip))
  chosen = np.stack([trip[rows, pairs[:, 0]], trip[rows, pairs[:, 1]], trip[rows, odd]], axis=1)
  # Probabilities of the true model in the stored item order [s01, s02, s12] of the (i, j, odd) triplet.
  true_p = triplet_math.pair_probabilities(cfg.human_beta * triplet_math.triplet_similarities(emb, chosen))
  n = cfg.things_train
  return chosen[:n], chosen[n:], true_p[:n].astype(np.float32), true_p[n:].astype(np.float32)


def _image_semantics(cfg: WorldConfig, emb: np.ndarray, pool_concepts: np.ndarray, pool_images: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
  """What a participant 'sees' in a pool image: its concept's meaning, a little instance detail and colour."""
  instance = rng.normal(0, 0.18 / np.sqrt(cfg.human_dim), (len(pool_concepts), cfg.human_dim))
  colour = pool_images.reshape(len(pool_images), -1, 3).mean(1) / 255.0
  colour = (colour - colour.mean(0)) @ rng.normal(0, 0.4, (3, cfg.human_dim))
  return (emb[pool_concepts] + instance + colour).astype(np.float32)


def _levels(cfg: WorldConfig, emb: np.ndarray, pool_labels: np.ndarray, pool_concepts: np.ndarray,
            pool_images: np.ndarray) -> tuple[np.ndarray, ...]:
  rng = _rng(cfg.seed, 5)
  n_basic = cfg.n_super * cfg.n_basic_per_super
  by_class = [np.flatnonzero(pool_labels == b) for b in range(n_basic)]
  n = cfg.levels_per_level
  trips, level = [], []
  for _ in range(n):  # coarse: three images of three different classes
    cls = rng.choice(n_basic, 3, replace=False)
    trips.append([rng.choice(by_class[c]) for c in cls])
  for _ in range(n):  # fine: three images of one class
    trips.append(rng.choice(by_class[rng.integers(n_basic)], 3, replace=False))
  for _ in range(n):  # class boundary: two of one class, one of another, in random positions
    a, b = rng.choice(n_basic, 2, replace=False)
    items = np.concatenate([rng.choice(by_class[a], 2, replace=False), [rng.choice(by_class[b])]])
    trips.append(rng.permutation(items))
  level = np.repeat(np.array(LEVELS), n)
  trips = np.asarray(trips, np.int64)
  seen = _image_semantics(cfg, emb, pool_concepts, pool_images, rng)
  sims = triplet_math.triplet_similarities(seen, trips)
  r = cfg.levels_responses
  beta = cfg.human_beta * np.exp(rng.normal(0, 0.25, (len(trips), r)))
  pair, probs = _choose(np.repeat(sims[:, None], r, axis=1), beta, rng)
  choices = triplet_math.ODD_OF_PAIR[pair]
  # Response times: slower when the participant is unsure (entropy), log-normal noise, capped at 15 s.
  rt = np.exp(np.log(1.2) + 0.9 * triplet_math.entropy(probs) + rng.normal(0, 0.35, (len(trips), r)))
  return trips, level, choices.astype(np.int64), np.minimum(rt, 15.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------


def make_world(cfg: WorldConfig = WorldConfig()) -> World:
  """Generate the world; a pure function of `cfg` (a few seconds at the default size)."""
  concept_super, concept_basic = _hierarchy(cfg)
  n_basic = cfg.n_super * cfg.n_basic_per_super
  emb = _human_embedding(cfg, concept_super, concept_basic)
  things_images = render(cfg, np.arange(len(concept_basic)), _rng(cfg.seed, 6))
  things_train, things_test, train_p, test_p = _things_triplets(cfg, emb)

  rng = _rng(cfg.seed, 7)
  pool_labels = np.repeat(np.arange(n_basic), cfg.images_per_class)
  pool_concepts = pool_labels * cfg.n_sub_per_basic + rng.integers(0, cfg.n_sub_per_basic, len(pool_labels))
  pool_images = render(cfg, pool_concepts, rng)
  names = np.array([f"class{lab:03d}/img{i:06d}.png" for i, lab in enumerate(pool_labels)])
  levels = _levels(cfg, emb, pool_labels, pool_concepts, pool_images)
  return World(
      config=dataclasses.asdict(cfg), n_super=cfg.n_super, n_basic=n_basic,
      concept_ids=np.array([f"c{c:03d}" for c in range(len(concept_basic))]),
      concept_super=concept_super, concept_basic=concept_basic, human_embedding=emb,
      things_images=things_images, things_train=things_train, things_test=things_test,
      things_train_probs=train_p, things_test_probs=test_p,
      pool_images=pool_images, pool_labels=pool_labels, pool_super=concept_super[pool_concepts],
      pool_concepts=pool_concepts, pool_file_names=names,
      levels_triplets=levels[0], levels_level=levels[1], levels_choices=levels[2], levels_rt=levels[3])


def summary(world: World) -> dict[str, Any]:
  """Headline numbers of a world: sizes and how well the simulation's own model predicts its humans."""
  emb = world.human_embedding
  test_sims = triplet_math.triplet_similarities(emb, world.things_test)
  out: dict[str, Any] = {
      "concepts": len(world.concept_ids), "classes": world.n_basic, "superordinates": world.n_super,
      "pool_images": len(world.pool_images), "things_train": len(world.things_train),
      "things_test": len(world.things_test), "levels_triplets": len(world.levels_triplets),
      "things_test_ceiling": triplet_math.odd_one_out_accuracy(test_sims),
  }
  for level in LEVELS:
    sel = world.levels_level == level
    votes = np.stack([(world.levels_choices[sel] == k).sum(1) for k in range(3)], 1)
    out[f"levels_{level}_agreement"] = float(np.mean(votes.max(1) / votes.sum(1)))
  return out


def save(world: World, writer: artifacts.ArtifactWriter) -> None:
  arrays = {f.name: getattr(world, f.name) for f in dataclasses.fields(World)
            if isinstance(getattr(world, f.name), np.ndarray)}
  writer.write_npz(FILE_NAME, **arrays)
  writer.write_json("world_config.json", world.config)
  writer.set_rows("pool_images", len(world.pool_images))
  writer.set_rows("things_images", len(world.things_images))
  writer.set_rows("levels_triplets", len(world.levels_triplets))


def load(source: str | artifacts.Artifact) -> World:
  """Load a world artifact (written by the `world` stage)."""
  art = source if isinstance(source, artifacts.Artifact) else artifacts.load(source, stage="world")
  arrays = art.load_npz(FILE_NAME)
  cfg = art.read_json("world_config.json")
  n_basic = cfg["n_super"] * cfg["n_basic_per_super"]
  return World(config=cfg, n_super=cfg["n_super"], n_basic=n_basic, **arrays)
