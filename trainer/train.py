"""Fine-tune a student on AligNet triplets (paper, Methods: "Objective function"; DESIGN.md "Compatibility").

Flax-examples style: flat functions, a pure `train_step` jitted at the call site. The student's representation
is its `embed_fn` (pre-logits), optionally followed by a linear triplet head (`head_dim`; the released trainer
uses 1024; 0 = none, so that before/after evaluations compare the same representation). Loss: KL (or JS)
between softmax(teacher similarities) and softmax(student dots / tau). Optimiser: clip -> Adam -> decay to the
INITIAL weights (decoupled, like the released kauldron `decay_to_init`) -> warm-up + cosine learning rate.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignet_data import artifacts, triplet_math
from alignet_data.checks import InputError
from alignet_data.models import batching
from trainer import input_pipeline, losses, triplet_sources

# Defaults suit the tiny demo student on 2 CPU cores (the demo preset asks for 900 steps of 64 triplets:
# pipelines/presets.py). For real students use RELEASED on top.
DEFAULTS: dict[str, Any] = {
    "shards": "",             # triplets artifact / published version URL (or a directory of released npz files)
    "format": "auto",         # auto | parquet | tfrecord | npz (auto: parquet, else tfrecord, else npz)
    "transform": "",          # released layout: the <transform> folder ("" = uncertainty_distillation when
                              # there is a choice, else the only one)
    "sampling": "",           # the training file's sampling ("" = cluster_border_500 when present, else the only)
    "images": "",             # image source spec the indices point into: demo:<world>:pool, files:<glob>,
                              # tfds:imagenet2012:train; "" = `world` if set, else the shards' provenance
    "tfds_data_dir": None,    # data_dir of a tfds: image source
    "world": "",              # demo world artifact URL: the images the shards' indices point into
    "image_split": "pool",    # which of the world's image sets the indices index ("pool" = ImageNet-like)
    "student": "demo-student",  # model spec for models.load_model
    "head_dim": -1,           # linear triplet head on the representation; 0 = none; -1 = auto (demo: none,
                              # other students: 1024, as the released trainer)
    "compute_dtype": "auto",  # float32 | bfloat16 | auto (bfloat16 on GPU/TPU, float32 on CPU); params stay f32
    "steps": 600,
    "batch_size": 64,         # global triplets per step (3x images), split over all devices
    "learning_rate": 1e-3,    # peak of the warm-up + cosine schedule (released, ViT-B: 3e-5)
    "warmup_steps": 60,
    "decay_to_init": 1.0,     # weight of the decoupled decay towards the initial weights (released: 1.0)
    "grad_clip": 1.0,         # global-norm clipping of the raw gradient; 0 = off
    "tau": losses.DEFAULT_TAU,
    "loss": "kl",             # "kl" (paper), "js" (released config), "contrastive" (hard)
    "seed": 0,
    "eval_batch_size": 256,
    "eval_every": 0,          # steps between validation passes; 0 = only before and after training
    "hooks": ["levels", "things"],  # extra validation on a demo world: Levels-like / THINGS-like accuracy
    "checkpoint_every": 0,    # steps between orbax checkpoints; 0 = only at the end
    "keep_checkpoints": 2,    # orbax max_to_keep
    "checkpoint_dir": "",     # orbax directory, a local path or gs://; "" = <workdir>/checkpoints. Set it when the
                              # workdir is on a filesystem orbax cannot write (memory://, s3://, ...)
    "input_threads": 2,       # Grain worker threads loading + preprocessing batches ahead of the step; 0 = in the
                              # training loop itself
    "prefetch_batches": 4,    # batches Grain keeps made ahead (its prefetch buffer; >= input_threads to use them)
    "input_processes": 0,     # Grain worker processes (mp_prefetch), each with input_threads threads; for file or
                              # TFDS images whose decoding holds the GIL. 0 = off (each costs a Python + JAX start)
    "log_every": 25,          # steps between rows of metrics.jsonl / TensorBoard points
}


# Valid ranges of the numeric config keys, checked by `validate_config` before anything is loaded or compiled.
_INT_MINIMUM = {"steps": 1, "batch_size": 1, "warmup_steps": 0, "eval_batch_size": 1, "eval_every": 0,
                "checkpoint_every": 0, "keep_checkpoints": 1, "input_threads": 0, "prefetch_batches": 0,
                "input_processes": 0, "log_every": 0, "head_dim": -1}
_FLOAT_MINIMUM = {"learning_rate": (0.0, False), "tau": (0.0, False),  # key -> (bound, bound allowed)
                  "decay_to_init": (0.0, True), "grad_clip": (0.0, True)}
_CHOICES = {"format": ("auto", "parquet", "tfrecord", "npz"), "loss": tuple(sorted(losses.LOSSES)),
            "compute_dtype": ("auto", "float32", "bfloat16")}
_HOOKS = ("levels", "things")
# Keys with a dedicated `alignet train` flag (the rest are set with --set KEY=VALUE).
_FLAGGED = {"steps", "batch_size", "learning_rate", "warmup_steps", "decay_to_init", "grad_clip", "tau", "seed",
            "eval_every", "checkpoint_every", "log_every", "head_dim", "format", "loss", "compute_dtype"}


def _option(key: str) -> str:
  """How the user sets `key`, for error messages: `steps (--steps)` or `keep_checkpoints (--set keep_checkpoints=)`."""
  flag = f"--{key.replace('_', '-')}" if key in _FLAGGED else f"--set {key}="
  return f"{key} ({flag})"


def validate_config(config: Mapping[str, Any], devices: int | None = None, processes: int | None = None) -> None:
  """Refuse out-of-range options up front (InputError naming the option and its value), before any data is
  read or anything compiled: a negative `steps` would otherwise train forever, `steps` 0 crash after exporting,
  and a bad `batch_size` fail only after compiling. `processes` and `devices` (all processes'), when known, must
  divide `batch_size`: each process loads an equal slice of every global batch, each device an equal part."""
  for key, minimum in _INT_MINIMUM.items():
    value = config.get(key, DEFAULTS[key])
    if isinstance(value, float) and value.is_integer():
      value = int(value)  # 1e5 in a JSON config
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
      raise InputError(f"train option {_option(key)} must be an integer >= {minimum}, got {value!r}.")
  for key, (bound, inclusive) in _FLOAT_MINIMUM.items():
    value = config.get(key, DEFAULTS[key])
    ok = (not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)
          and math.isfinite(value) and (value >= bound if inclusive else value > bound))
    if not ok:
      raise InputError(f"train option {_option(key)} must be a finite number {'>=' if inclusive else '>'} {bound:g}, "
                       f"got {value!r}.")
  for key, choices in _CHOICES.items():
    value = config.get(key, DEFAULTS[key])
    if value not in choices:
      raise InputError(f"train option {_option(key)} must be one of {list(choices)}, got {value!r}.")
  hooks = config.get("hooks", DEFAULTS["hooks"]) or []
  if not isinstance(hooks, list | tuple) or not all(isinstance(h, str) and h in _HOOKS for h in hooks):
    raise InputError(f"train option {_option('hooks')} must be a list drawn from {list(_HOOKS)}, got {hooks!r}.")
  try:
    input_pipeline.check_seed(config.get("seed", DEFAULTS["seed"]))
  except ValueError as e:
    raise InputError(f"train option {_option('seed')}: {e}") from e
  batch_size = int(config.get("batch_size", DEFAULTS["batch_size"]))
  if processes and batch_size % processes:
    raise InputError(f"train option {_option('batch_size')} {batch_size} does not split over {processes} processes "
                     f"(each loads an equal slice of every global batch); use a multiple of {processes}.")
  if devices and batch_size % devices:
    raise InputError(f"train option {_option('batch_size')} {batch_size} does not split over {devices} devices; "
                     f"use a multiple of {devices}.")


# The released trainer's settings (google-deepmind/alignet configs/siglip.py), as trainer/configs/released.json
# holds them (the student, transform and sampling besides): what DEFAULTS change for the demo is listed in the README.
RELEASED: dict[str, Any] = {"steps": 100_000, "batch_size": 512, "learning_rate": 3e-5, "warmup_steps": 5_000,
                            "decay_to_init": 1.0, "grad_clip": 0.0, "head_dim": 1024, "tau": 100.0, "loss": "js",
                            "compute_dtype": "float32", "seed": 42, "checkpoint_every": 10_000,
                            "keep_checkpoints": 3, "eval_every": 5_000}


# ---------------------------------------------------------------------------------------------- optimiser


class DecayToInitState(NamedTuple):
  init_params: Any


def decay_to_init(weight_decay: float) -> optax.GradientTransformation:
  """Add weight_decay * (params - init_params) to the updates: weight decay towards the pretrained weights.

  Placed after Adam and before the learning rate, it is decoupled (AdamW-style), as in the released trainer.
  """
  def init_fn(params):
    # A copy, not an alias: the train step donates the state, and params and init_params must not share buffers.
    return DecayToInitState(init_params=jax.tree.map(lambda p: jnp.array(p, copy=True), params))

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("decay_to_init needs the current params: call tx.update(grads, opt_state, params).")
    updates = jax.tree.map(lambda u, p, p0: u + weight_decay * (p - p0), updates, params, state.init_params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(config: Mapping[str, Any]) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then cosine decay to 0 at the last step."""
  steps = int(config["steps"])
  warmup = min(int(config["warmup_steps"]), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, float(config["learning_rate"]), warmup, max(steps, warmup + 1))


def make_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
  parts = []
  if config.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(float(config["grad_clip"])))
  parts.append(optax.scale_by_adam())
  if config.get("decay_to_init"):
    parts.append(decay_to_init(float(config["decay_to_init"])))
  parts.append(optax.scale_by_learning_rate(make_schedule(config)))
  return optax.chain(*parts)


# ------------------------------------------------------------------------------------------ model + state


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any        # {"encoder": student params, "head": {"kernel", "bias"} (only with head_dim > 0)}
  opt_state: Any


def resolve_dtype(name: str) -> Any:
  """float32 | bfloat16 | auto: bfloat16 compute on accelerators (GPU/TPU), float32 on CPU."""
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"compute_dtype must be float32, bfloat16 or auto; got {name!r}.")
  return jnp.dtype(name)


def make_represent(embed_fn: Callable[[Any, jax.Array], jax.Array],
                   compute_dtype: Any = jnp.float32) -> Callable[[Any, jax.Array], jax.Array]:
  """The representation the loss sees: the student's embed_fn, then the linear triplet head if there is one.

  With a bfloat16 compute dtype the encoder runs on bf16 copies of the float32 master weights (mixed
  precision: gradients flow back through the cast into float32); the head and the loss stay float32.
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def represent(params, images):
    encoder = params["encoder"]
    if compute_dtype != jnp.float32:
      encoder = jax.tree.map(lambda p: p.astype(compute_dtype), encoder)
      images = images.astype(compute_dtype)
    z = embed_fn(encoder, images).astype(jnp.float32)
    if "head" in params:
      z = z @ params["head"]["kernel"] + params["head"]["bias"]
    return z
  return represent


def head_size(head_dim: int, model_config: Mapping[str, Any]) -> int:
  """-1 = auto: the model config's `triplet_head` where it names one (siglip-b/16, the released student: 1024),
  else none for the demo students (before/after compare one representation) and 1024 for real ones."""
  if int(head_dim) >= 0:
    return int(head_dim)
  if model_config.get("triplet_head") is not None:
    return int(model_config["triplet_head"])
  return 0 if str(model_config.get("name", "")).startswith("vit-demo") else 1024


def init_params(encoder_params: Any, dim: int, head_dim: int, rng: jax.Array) -> dict[str, Any]:
  # Copies: the train step donates its state, which must not delete the caller's model params.
  params = {"encoder": jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), encoder_params)}
  if head_dim:
    kernel = jax.nn.initializers.lecun_normal()(rng, (dim, head_dim), jnp.float32)
    params["head"] = {"kernel": kernel, "bias": jnp.zeros((head_dim,), jnp.float32)}
  return params


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _triplet_representations(represent, params, images):
  b = images.shape[0]
  z = represent(params, images.reshape((b * 3,) + images.shape[2:]))
  return z.reshape(b, 3, -1)


def train_step(state: TrainState, images: jax.Array, target_sims: jax.Array, *, represent: Callable,
               tx: optax.GradientTransformation, loss: str = "kl", tau: float = losses.DEFAULT_TAU,
               schedule: optax.Schedule | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a batch of (B, 3, H, W, C) preprocessed image triplets. Pure: jit at the call site."""
  loss_fn = losses.get_loss(loss)

  def objective(params):
    sims = triplet_math.pair_similarities_jax(_triplet_representations(represent, params, images))
    return jnp.mean(loss_fn(sims, target_sims, tau)), sims

  (value, sims), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": value,
      "triplet_accuracy": jnp.mean(losses.triplet_agreement(sims, target_sims)),
      "grad_norm": optax.global_norm(grads),
  }
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, images: jax.Array, target_sims: jax.Array, mask: jax.Array, *, represent: Callable,
              loss: str = "kl", tau: float = losses.DEFAULT_TAU) -> dict[str, jax.Array]:
  """Masked sums (loss, agreeing odd-one-out choices, count) over a padded batch. Pure: jit at the call site."""
  sims = triplet_math.pair_similarities_jax(_triplet_representations(represent, params, images))
  return {
      "loss_sum": jnp.sum(losses.get_loss(loss)(sims, target_sims, tau) * mask),
      "correct": jnp.sum(losses.triplet_agreement(sims, target_sims) * mask),
      "count": jnp.sum(mask),
  }


# ----------------------------------------------------------------------------------------------- the loop

BEFORE_FILE = "metrics_before.json"  # the validation figures before training, in the workdir
_OPTIMIZER_KEYS = ("steps", "learning_rate", "warmup_steps", "decay_to_init", "grad_clip")


def make_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh ('data') over all devices of all hosts (or the given ones).

  Ordered by process, so that process i's devices hold the i-th contiguous block of every batch: the rows
  `input_pipeline.host_slice` gives it.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(list(devices)), ("data",))


def _shardings(mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  from jax.sharding import NamedSharding, PartitionSpec
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(mesh: jax.sharding.Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """This host's rows of a global batch -> global arrays split along the batch axis over the mesh."""
  _, data = _shardings(mesh)
  if jax.process_count() == 1:
    return tuple(jax.device_put(a, data) for a in arrays)
  return tuple(jax.make_array_from_process_local_data(data, a) for a in arrays)


def replicate(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  return jax.device_put(tree, _shardings(mesh)[0])


@functools.lru_cache(maxsize=8)
def compiled_steps(embed_fn: Callable, opt_key: tuple, loss: str, tau: float, compute_dtype: str,
                   mesh: jax.sharding.Mesh) -> tuple[Any, Callable, Callable]:
  """(tx, jitted train step, jitted eval step) for a mesh: state replicated, batches split on 'data'.

  Cached so that repeated runs of one model reuse the compilation.
  """
  config = dict(opt_key)
  represent = make_represent(embed_fn, jnp.dtype(compute_dtype))
  tx = make_optimizer(config)
  step_fn = jit_train_step(mesh, represent=represent, tx=tx, loss=loss, tau=tau, schedule=make_schedule(config))
  rep, data = _shardings(mesh)
  eval_fn = jax.jit(functools.partial(eval_step, represent=represent, loss=loss, tau=tau),
                    in_shardings=(rep, data, data, data), out_shardings=rep)
  return tx, step_fn, eval_fn


def sharded_embed(embed_fn: Callable, mesh: jax.sharding.Mesh,
                  preprocess: Callable[[np.ndarray], np.ndarray]) -> Callable[[Any, np.ndarray], np.ndarray]:
  """(encoder params, a global batch of uint8 images, the same on every process) -> its embeddings, every row,
  on every process. Each process preprocesses only its slice and the devices of all processes split the rows;
  the batch must split over the mesh (the validation batch size does)."""
  rep, data = _shardings(mesh)
  embed = jax.jit(embed_fn, in_shardings=(rep, data), out_shardings=rep)

  def fn(encoder: Any, images: np.ndarray) -> np.ndarray:
    rows = input_pipeline.host_slice(np.asarray(images), jax.process_index(), jax.process_count())
    return np.asarray(embed(encoder, *shard_batch(mesh, np.asarray(preprocess(rows)))))
  return fn


def jit_train_step(mesh: jax.sharding.Mesh, **step_kwargs: Any) -> Callable:
  """`train_step` jitted for a data-parallel mesh: state replicated, (images, targets) split on 'data', so XLA
  all-reduces the gradients; the state is donated (updated in place)."""
  rep, data = _shardings(mesh)
  return jax.jit(functools.partial(train_step, **step_kwargs), in_shardings=(rep, data, data),
                 out_shardings=(rep, rep), donate_argnums=0)


def checkpoint_directory(workdir: str, checkpoint_dir: str = "") -> str:
  """The directory orbax is given: `checkpoint_dir`, else <workdir>/checkpoints; gs:// as is, local paths absolute.

  Orbax writes gs:// natively (etils.epath + tensorstore's GCS driver) but nothing else with a scheme: epath has
  no memory:// backend (KeyError), and orbax's tensorstore specs fall back to the local `file` driver, which
  needs an absolute path. So other schemes fail here, naming the fix, rather than deep inside orbax.
  """
  url = checkpoint_dir or artifacts.join(workdir, "checkpoints")
  scheme, sep, rest = url.partition("://")
  if not sep:
    return os.path.abspath(url)
  if scheme in ("file", "local"):
    return os.path.abspath(rest)
  if scheme == "gs":
    return url
  raise ValueError(f"Orbax cannot write checkpoints to {url!r} (local paths and gs:// only); set checkpoint_dir "
                   "(--checkpoint-dir) to a local directory or a gs:// URL; the workdir can stay where it is.")


def _checkpoint_manager(directory: str, keep: int = 2):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _save(manager, state: TrainState) -> None:
  import orbax.checkpoint as ocp
  manager.save(int(state.step), args=ocp.args.StandardSave(state))


# ------------------------------------------------------------------------------------- validation hooks


def demo_hooks(world_url: str, names: Sequence[str]) -> dict[str, Callable[[Callable], dict[str, float]]]:
  """Validation hooks on a demo world: name -> fn(embed_uint8) -> {metric: value}.

  `levels`: the student's odd-one-out accuracy against the simulated participants' majority vote per level
  (coarse / fine / boundary; no-majority triplets excluded), as the evaluate stage computes it (without CIs).
  `things`: THINGS-like test accuracy against the human odd one out.
  """
  from alignet_data import demo_world
  from alignet_data.evaluation import metrics

  unknown = set(names) - {"levels", "things"}
  if unknown:
    raise ValueError(f"Unknown validation hooks {sorted(unknown)}; choose from ['levels', 'things'].")
  world = demo_world.load(world_url)
  hooks: dict[str, Callable[[Callable], dict[str, float]]] = {}
  if "levels" in names:
    pool_ids, local = np.unique(world.levels_triplets, return_inverse=True)
    local = local.reshape(world.levels_triplets.shape)
    majority = metrics.majority_vote(world.levels_choices)
    levels = np.asarray(world.levels_level).astype(str)

    def levels_hook(embed):
      sims = triplet_math.triplet_similarities(embed(world.pool_images[pool_ids]), local)
      correct = triplet_math.odd_one_out_correct(sims, majority)
      return {f"levels_{lv}_accuracy": float(correct[(levels == lv) & (majority >= 0)].mean())
              for lv in sorted(set(levels))}
    hooks["levels"] = levels_hook
  if "things" in names:
    def things_hook(embed):
      sims = triplet_math.triplet_similarities(embed(world.things_images), world.things_test)
      return {"things_accuracy": float(triplet_math.odd_one_out_correct(sims).mean())}
    hooks["things"] = things_hook
  return hooks


# ----------------------------------------------------------------------------------------------- the loop


def train_and_evaluate(config: Mapping[str, Any], workdir: str, *, model: Any = None,
                       images: input_pipeline.ImageSource | None = None, mesh: jax.sharding.Mesh | None = None,
                       log: Callable[[str], None] = print, save_config: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
  """Train to `config["steps"]` (resuming from the latest checkpoint), validate, export.

  `save_config` is written to `<workdir>/config.json` once the inputs are known good (the CLI's resolved config).

  `workdir` is any fsspec URL (a local path, file://, gs://, memory://); everything but the checkpoints is
  written through fsspec: `tensorboard/` (event files), `metrics.jsonl` (a row every `log_every` steps, written
  as training goes), `metrics_before.json` (validation before training, written as soon as measured, so that a
  killed and resumed run still reports its `*_before` figures), `metrics.json` (the final figures, also
  returned), `student.npz` (the fine-tuned encoder, big_vision layout; `load_model("<name>:<workdir>/student.npz")`
  loads it), `student.json` (the model config and how to load it) and `triplet_head.npz` when there is a head.
  Orbax checkpoints go to `checkpoint_directory` (`<workdir>/checkpoints` unless config `checkpoint_dir` says
  otherwise). `model` and `images` override the config's `student` and image source (tests inject tiny
  stand-ins); `mesh` defaults to all devices. `validate_config` runs first: a bad option touches nothing.

  With several processes (`jax.distributed` initialized, see trainer/distributed.py) every process calls this
  with the same arguments: each loads its slice of every training and validation batch (and of the demo hooks'
  images), all take part in every step, validation pass and orbax save/restore (collective), and only process 0
  logs and writes the workdir (metrics, TensorBoard, config.json, student.npz). All return the same figures but
  their own timings.

  `input_images_per_second` in the result is the input pipeline's own speed per worker: the images it made over
  the seconds spent inside its map function, summed over whichever threads or processes ran it (each batch
  carries its own time). With N threads not bound by the GIL, the pipeline can make about N times that.
  `input_triplets` counts the training triplets this process loaded (steps trained x batch_size / processes).
  """
  from tqdm import tqdm

  from trainer import events

  config = {**DEFAULTS, **config}
  mesh = make_mesh() if mesh is None else mesh
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  # First: nothing is read, written or compiled for a bad config.
  validate_config(config, devices=n_dev, processes=n_proc)
  lead = jax.process_index() == 0  # The one process that logs and writes the workdir.
  if not lead:
    log = _discard
  steps, batch_size = int(config["steps"]), int(config["batch_size"])
  seed = input_pipeline.check_seed(config["seed"])
  ckpt_dir = checkpoint_directory(workdir, str(config["checkpoint_dir"] or ""))
  eval_batch = -(-int(config["eval_batch_size"]) // n_dev) * n_dev
  if not config["shards"]:
    raise InputError("config['shards'] is empty: give a triplets artifact, a published version or a directory of "
                     "released alignet_*.npz files (--shards).")
  fs, root = artifacts.url_to_fs(workdir)
  sources = triplet_sources.resolve(config["shards"], fmt=config["format"], transform=config["transform"] or None,
                                    sampling=config["sampling"] or None)
  train_data = input_pipeline.read_triplets(sources, "train")
  valid_sets = {name: input_pipeline.read_triplets(sources, name) for name in sources.valid}
  if not valid_sets:
    log(f"[train] warning: {config['shards']} has no validation file for this transform; no val_* figures")
  spec = None
  if images is None:
    spec = input_pipeline.image_spec(config, sources.artifact)
    images = input_pipeline.open_images(spec, config["tfds_data_dir"])
  input_pipeline.check_indices(train_data, images, f"{config['shards']} (train)")
  for name, data in valid_sets.items():
    input_pipeline.check_indices(data, images, f"{config['shards']} (validation set {name})")
  if lead:
    fs.makedirs(root, exist_ok=True)  # Only now: bad inputs leave no workdir behind.
  if save_config is not None and lead:
    artifacts.write_bytes(artifacts.join(workdir, "config.json"), artifacts.json_bytes(save_config))
  if model is None:
    from alignet_data import models
    model = models.load_model(config["student"])
  head_dim = head_size(config["head_dim"], model.config)
  dtype = resolve_dtype(config["compute_dtype"])
  log(f"[train] {len(train_data)} train / {sum(map(len, valid_sets.values()))} validation triplets from "
      f"{config['shards']}: {sources.describe()}"
      f"{f'; images {spec}' if spec else ''}; student {model.config.get('name', config['student'])} "
      f"(dim {model.dim}, head {head_dim or 'none'}, {dtype.name} compute) on {n_dev} {jax.default_backend()} "
      f"device(s){f' of {n_proc} processes' if n_proc > 1 else ''}")

  opt_key = tuple((k, config[k]) for k in _OPTIMIZER_KEYS)
  tx, step_fn, eval_fn = compiled_steps(model.embed_fn, opt_key, config["loss"], float(config["tau"]), dtype.name,
                                        mesh)
  rng = jax.random.PRNGKey(seed)
  state = replicate(mesh, create_train_state(init_params(model.params, model.dim, head_dim, rng), tx))

  hooks = {}
  if config["hooks"] and isinstance(images, input_pipeline.DemoImages) and images.world_url:
    hooks = demo_hooks(images.world_url, list(config["hooks"]))
  # Grain readers (threads) and this host's slice of every global batch, for training and validation alike.
  reading = {"threads": int(config["input_threads"]), "prefetch": int(config["prefetch_batches"]),
             "process_index": jax.process_index(), "process_count": n_proc}
  embed_sharded = sharded_embed(model.embed_fn, mesh, model.preprocess)

  def eval_set(params, data: input_pipeline.Triplets) -> dict[str, float]:
    out: dict[str, float] = {}
    for batch in input_pipeline.eval_dataset(data, images, model.preprocess, batch_size=eval_batch, **reading):
      got = eval_fn(params, *shard_batch(mesh, batch["images"], batch["similarities"], batch["mask"]))
      for k, v in got.items():
        out[k] = out.get(k, 0.0) + float(v)
    n = max(out["count"], 1.0)
    return {"val_loss": out["loss_sum"] / n, "val_triplet_accuracy": out["correct"] / n,
            "val_triplets": int(out["count"])}

  def run_eval(params) -> dict[str, Any]:
    """Each validation set's figures (`val_<figure>/<sampling>`) and, over the sets, their unweighted mean."""
    per_set = {name: eval_set(params, data) for name, data in valid_sets.items()}
    result: dict[str, Any] = {}
    if per_set:
      result = {"val_loss": float(np.mean([r["val_loss"] for r in per_set.values()])),
                "val_triplet_accuracy": float(np.mean([r["val_triplet_accuracy"] for r in per_set.values()])),
                "val_triplets": sum(r["val_triplets"] for r in per_set.values())}
      for name, r in per_set.items():
        result.update({f"{k}/{name}": v for k, v in r.items()})
    for hook in hooks.values():
      result.update(hook(lambda imgs: batching.embed_padded(functools.partial(embed_sharded, params["encoder"]),
                                                            imgs, eval_batch)))
    return result

  manager = _checkpoint_manager(ckpt_dir, int(config["keep_checkpoints"]))
  start = 0
  if manager.latest_step() is not None:
    import orbax.checkpoint as ocp
    start = int(manager.latest_step())
    if start > steps:
      raise ValueError(f"{ckpt_dir} holds a checkpoint at step {start}, past steps={steps}: raise steps or use "
                       "a fresh workdir.")
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    log(f"[train] resumed from step {start} (latest checkpoint in {ckpt_dir})")
  if start == 0:
    before = run_eval(state.params)
    if lead:  # Saved at once, so that a run killed before it writes metrics.json still reports them when resumed.
      artifacts.write_bytes(artifacts.join(workdir, BEFORE_FILE), artifacts.json_bytes(before))
    figures_before = _suffixed(before)
  else:
    before, figures_before = None, _saved_before(workdir, log)

  log_url = artifacts.join(workdir, "metrics.jsonl")
  rows = _read_jsonl(log_url, upto=start)  # A killed run's rows past its last checkpoint are dropped.
  log_file = events.LogFile(log_url, b"".join(_jsonl_row(r) for r in rows)) if lead else _Discard()
  tb = events.EventWriter(artifacts.join(workdir, "tensorboard")) if lead else _Discard()
  if before is not None:
    tb.scalars(0, _tb_scalars(before))
  # Steps start..steps-1 of the one batch order of this seed: a resumed run reads what a straight run would.
  batches = iter(input_pipeline.train_dataset(
      train_data, images, model.preprocess, batch_size=batch_size, seed=seed, start_step=start, stop_step=steps,
      processes=int(config["input_processes"]), **reading))
  input_seconds = 0.0  # Seconds the input workers spent making batches (summed): the pipeline's own speed.
  input_triplets = 0  # Training triplets this process loaded: its slice of every global batch.

  every = int(config["log_every"]) or steps
  eval_every = int(config["eval_every"])
  ckpt_every = int(config["checkpoint_every"])
  first_step_s, t0, t1, last = None, time.perf_counter(), None, (start, time.perf_counter())
  try:
    with tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not lead) as bar:
      for step, batch in enumerate(batches, start + 1):  # A Python counter: no device sync.
        input_seconds += batch["seconds"]
        input_triplets += len(batch["similarities"])
        state, metrics = step_fn(state, *shard_batch(mesh, batch["images"], batch["similarities"]))
        if first_step_s is None:  # The first step includes compilation: keep it out of steps/s.
          jax.block_until_ready(metrics)
          first_step_s = time.perf_counter() - t0
          t1 = last_t = time.perf_counter()
          last = (step, last_t)
        if step % every == 0 or step == steps:
          row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
          now = time.perf_counter()
          if step > last[0]:
            row["steps_per_second"] = (step - last[0]) / (now - last[1])
            row["images_per_second"] = row["steps_per_second"] * batch_size * 3
          last = (step, now)
          if eval_every and step % eval_every == 0 and step < steps:
            row.update(run_eval(state.params))
            last = (step, time.perf_counter())
          rows.append(row)
          log_file.write(_jsonl_row(row))
          log_file.flush()
          tb.scalars(step, _tb_scalars(row))
          bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['triplet_accuracy']:.3f}")
        if ckpt_every and step % ckpt_every == 0 and step < steps:
          _save(manager, state)
          log_file.flush(force=True)  # Rows up to a checkpoint survive a kill even where flushes are rate-limited.
          tb.flush(force=True)
        bar.update(1)
  finally:
    batches.close()
    log_file.close()
  jax.block_until_ready(state)
  trained = steps - start
  seconds = time.perf_counter() - t0
  rate_steps = max(trained - 1, 0)
  steps_per_second = rate_steps / (time.perf_counter() - t1) if rate_steps and t1 is not None else 0.0
  if trained and (manager.latest_step() or -1) < steps:
    _save(manager, state)
  manager.wait_until_finished()
  manager.close()

  after = run_eval(state.params)
  tb.scalars(steps, _tb_scalars(after))
  tb.close()
  if lead:
    export_student(workdir, state.params, model)

  result = {
      "loss": rows[-1]["loss"] if rows else None,
      **after,
      "train_triplets": len(train_data),
      "steps": steps,
      "steps_trained": trained,
      "resumed_from": start,
      "batch_size": batch_size,
      "devices": int(n_dev),
      "processes": n_proc,
      "compute_dtype": dtype.name,
      "head_dim": head_dim,
      "steps_per_second": round(steps_per_second, 3),
      "images_per_second": round(steps_per_second * batch_size * 3, 1),
      "input_images_per_second": round(input_triplets * 3 / input_seconds, 1) if input_seconds else None,
      "input_triplets": input_triplets,
      "input_threads": reading["threads"],
      "first_step_seconds": round(first_step_s or 0.0, 2),
      "train_seconds": round(seconds, 2),
      "student": model.config.get("name", config["student"]),
  }
  result.update(figures_before)
  if lead:
    artifacts.write_bytes(artifacts.join(workdir, "metrics.json"), artifacts.json_bytes(result))
  before_acc, after_acc = result.get("val_triplet_accuracy_before"), result.get("val_triplet_accuracy")
  log(f"[train] val triplet accuracy {'?' if before_acc is None else f'{before_acc:.3f}'} -> "
      f"{'?' if after_acc is None else f'{after_acc:.3f}'}; {result['steps_per_second']:.2f} steps/s")
  return result


def _discard(*_: Any, **__: Any) -> None:
  """The log of every process but 0."""


class _Discard:
  """Stands in for the metrics.jsonl and TensorBoard writers on every process but 0."""
  write = scalars = flush = close = staticmethod(_discard)


def _suffixed(before: Mapping[str, Any]) -> dict[str, Any]:
  return {"{}_before{}{}".format(*k.partition("/")): v for k, v in before.items() if not k.startswith("val_triplets")}


def _saved_before(workdir: str, log: Callable[[str], None]) -> dict[str, Any]:
  """A resumed run's `*_before` figures, as the workdir's first run measured them: from BEFORE_FILE (written
  as soon as they were computed), else from the metrics.json of a workdir written before that file existed."""
  url = artifacts.join(workdir, BEFORE_FILE)
  try:
    return _suffixed(artifacts.read_json(url))
  except FileNotFoundError:
    pass
  except ValueError as e:  # Figures only, not training state: a damaged file costs them, not the run.
    log(f"[train] ignoring {url} ({e}): this run reports no *_before figures")
    return {}
  try:
    previous = artifacts.read_json(artifacts.join(workdir, "metrics.json"))
  except (FileNotFoundError, ValueError):
    previous = {}
  return {k: v for k, v in previous.items() if "_before" in k}


def _tb_scalars(row: Mapping[str, Any]) -> dict[str, float]:
  """TensorBoard tags: validation figures (val_*, hook accuracies) under valid/, the rest under train/."""
  out = {}
  for k, v in row.items():
    if k == "step" or k.startswith("val_triplets"):
      continue
    if k.startswith("val_"):
      out["valid/" + k[4:]] = v
    elif k.startswith(("levels_", "things_")):
      out["valid/" + k] = v
    else:
      out["train/" + k] = v
  return out


def _jsonl_row(row: Mapping[str, Any]) -> bytes:
  return (json.dumps(row, sort_keys=True) + "\n").encode()


def _read_jsonl(url: str, upto: int) -> list[dict[str, Any]]:
  fs, path = artifacts.url_to_fs(url)
  if not fs.isfile(path):
    return []
  with fs.open(path, "rb") as f:
    return [r for r in map(json.loads, f.read().decode().splitlines()) if r["step"] <= upto]


def export_student(workdir: str, params: Mapping[str, Any], model: Any) -> str:
  """Write the fine-tuned encoder as `student.npz` (+ `student.json`) into `workdir` (any fsspec URL); returns
  its load_model spec."""
  from alignet_data import models

  name = model.config.get("name")
  url = artifacts.join(workdir, "student.npz")
  models.save_checkpoint(url, jax.tree.map(np.asarray, params["encoder"]))
  if "head" in params:
    head = jax.tree.map(np.asarray, params["head"])
    buf = io.BytesIO()  # zipfile seeks; object-store writers cannot.
    np.savez(buf, kernel=head["kernel"], bias=head["bias"])
    artifacts.write_bytes(artifacts.join(workdir, "triplet_head.npz"), buf.getvalue())
  info = {"model": name, "model_config": dict(model.config), "checkpoint": "student.npz",
          "head": "triplet_head.npz" if "head" in params else None,
          "representation": "encoder (embed_fn); the triplet head, if any, is saved separately"}
  artifacts.write_bytes(artifacts.join(workdir, "student.json"), artifacts.json_bytes(info))
  return f"{name}:{url}"


def load_student(train_url: str) -> Any:
  """The fine-tuned encoder of a train artifact (or workdir) as a `models.LoadedModel`, from student.json."""
  from alignet_data import models

  art = artifacts.try_load(train_url)
  if art is not None:
    info, path = art.read_json("student.json"), art.path("student.npz")
  else:  # A bare workdir of train_and_evaluate (no manifest).
    try:
      info = artifacts.read_json(artifacts.join(train_url, "student.json"))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{train_url} has no student.json: is it a train artifact (run `alignet train`)?") from e
    path = artifacts.join(train_url, info["checkpoint"])
  return models.from_checkpoint(info["model_config"], path, prefix="")
