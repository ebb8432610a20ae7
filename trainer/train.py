"""Fine-tune a student on AligNet triplets (paper, Methods: "Objective function"; DESIGN.md "Compatibility").

Flax-examples style: flat functions, a pure `train_step` jitted at the call site. The student's representation
is its `embed_fn` (pre-logits), optionally followed by a linear triplet head (`head_dim`; the released trainer
uses 1024; 0 = none, so that before/after evaluations compare the same representation). Loss: KL (or JS)
between softmax(teacher similarities) and softmax(student dots / tau). Optimiser: clip -> Adam -> decay to the
INITIAL weights (decoupled, like the released kauldron `decay_to_init`) -> warm-up + cosine learning rate.
"""
from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignet_data import artifacts
from trainer import input_pipeline, losses

# Defaults are the demo's (tiny student, 2 CPU cores, ~1 minute): measured on the demo chain, 600 steps of 64
# triplets raise the student's coarse Levels-like accuracy most. For real students use RELEASED on top.
DEFAULTS: dict[str, Any] = {
    "shards": "",             # triplets (or publish) artifact URL holding shards/{train,valid}-*.parquet
    "world": "",              # demo world artifact URL: the images the shards' indices point into
    "image_split": "pool",    # which of the world's image sets the indices index ("pool" = ImageNet-like)
    "student": "demo-student",  # model spec for models.load_model
    "head_dim": 0,            # linear triplet head on the representation; 0 = none (released trainer: 1024)
    "steps": 600,
    "batch_size": 64,         # triplets per step (3x images)
    "learning_rate": 1e-3,    # peak of the warm-up + cosine schedule (released, ViT-B: 3e-5)
    "warmup_steps": 60,
    "decay_to_init": 1.0,     # weight of the decoupled decay towards the initial weights (released: 1.0)
    "grad_clip": 1.0,         # global-norm clipping of the raw gradient; 0 = off
    "tau": losses.DEFAULT_TAU,
    "loss": "kl",             # "kl" (paper), "js" (released config), "contrastive" (hard)
    "seed": 0,
    "eval_batch_size": 256,
    "eval_every": 0,          # steps between validation passes; 0 = only before and after training
    "checkpoint_every": 0,    # steps between orbax checkpoints; 0 = only at the end
    "log_every": 25,          # steps between rows of metrics.jsonl
}


# The released trainer's settings (google-deepmind/alignet configs/siglip.py), for ViT-B-sized students.
RELEASED: dict[str, Any] = {"steps": 100_000, "batch_size": 512, "learning_rate": 3e-5, "warmup_steps": 5_000,
                            "decay_to_init": 1.0, "head_dim": 1024, "tau": 100.0, "loss": "js",
                            "checkpoint_every": 10_000, "eval_every": 5_000}


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


def make_represent(embed_fn: Callable[[Any, jax.Array], jax.Array]) -> Callable[[Any, jax.Array], jax.Array]:
  """The representation the loss sees: the student's embed_fn, then the linear triplet head if there is one."""
  def represent(params, images):
    z = embed_fn(params["encoder"], images).astype(jnp.float32)
    if "head" in params:
      z = z @ params["head"]["kernel"] + params["head"]["bias"]
    return z
  return represent


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
    sims = losses.pair_dots(_triplet_representations(represent, params, images))
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
  sims = losses.pair_dots(_triplet_representations(represent, params, images))
  return {
      "loss_sum": jnp.sum(losses.get_loss(loss)(sims, target_sims, tau) * mask),
      "correct": jnp.sum(losses.triplet_agreement(sims, target_sims) * mask),
      "count": jnp.sum(mask),
  }


def evaluate(eval_fn: Callable, params: Any, data: input_pipeline.Triplets, images: input_pipeline.ImageSource,
             preprocess: Callable, batch_size: int) -> dict[str, float]:
  """Validation loss and triplet accuracy (student's odd one out == teacher's) over every triplet of `data`."""
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for idx, sims, mask in input_pipeline.eval_batches(data, batch_size):
    x = input_pipeline.triplet_images(idx, images, preprocess)
    out = eval_fn(params, x, sims, mask)
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return {"loss": totals["loss_sum"] / n, "triplet_accuracy": totals["correct"] / n, "count": int(totals["count"])}


# ----------------------------------------------------------------------------------------------- the loop

_OPTIMIZER_KEYS = ("steps", "learning_rate", "warmup_steps", "decay_to_init", "grad_clip")


@functools.lru_cache(maxsize=8)
def _compiled(embed_fn: Callable, opt_key: tuple, loss: str, tau: float) -> tuple[Any, Callable, Callable]:
  """(tx, jitted train step, jitted eval step), cached so that repeated runs of one model reuse the compilation."""
  config = dict(opt_key)
  represent = make_represent(embed_fn)
  tx = make_optimizer(config)
  step_fn = jax.jit(functools.partial(train_step, represent=represent, tx=tx, loss=loss, tau=tau,
                                      schedule=make_schedule(config)), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, represent=represent, loss=loss, tau=tau))
  return tx, step_fn, eval_fn


def _checkpoint_manager(workdir: str, keep: int = 2):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _save(manager, state: TrainState) -> None:
  import orbax.checkpoint as ocp
  manager.save(int(state.step), args=ocp.args.StandardSave(state))


def train_and_evaluate(config: Mapping[str, Any], workdir: str, *, model: Any = None,
                       images: input_pipeline.ImageSource | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
  """Train `config["steps"]` steps (resuming from the latest checkpoint in workdir), evaluate, export.

  Writes into the local directory `workdir`: `checkpoints/` (orbax), `metrics.jsonl` (a row every
  `log_every` steps), `metrics.json` (the final figures, also returned), `student.npz` (the fine-tuned encoder,
  big_vision layout; `load_model("<name>:<workdir>/student.npz")` loads it), `student.json` (the model config
  name and how to load it) and `triplet_head.npz` when there is a head. `model` and `images` override the
  config's `student` and `world` (tests inject tiny stand-ins).
  """
  from tqdm import tqdm

  config = {**DEFAULTS, **config}
  steps, batch_size = int(config["steps"]), int(config["batch_size"])
  os.makedirs(workdir, exist_ok=True)

  shards = artifacts.load(config["shards"])
  train_data = input_pipeline.read_triplets(shards, "train")
  valid_data = input_pipeline.read_triplets(shards, "valid")
  if images is None:
    if not config["world"]:
      raise ValueError("config['world'] is empty: give the demo world artifact whose images the shards index.")
    images = input_pipeline.demo_world_images(config["world"], config["image_split"])
  input_pipeline.check_indices(train_data, images, f"{shards.url} (train)")
  input_pipeline.check_indices(valid_data, images, f"{shards.url} (valid)")
  if model is None:
    from alignet_data import models
    model = models.load_model(config["student"])
  log(f"[train] {len(train_data)} train / {len(valid_data)} valid triplets from {shards.url}; "
      f"student {model.config.get('name', config['student'])} (dim {model.dim})")

  opt_key = tuple((k, config[k]) for k in _OPTIMIZER_KEYS)
  tx, step_fn, eval_fn = _compiled(model.embed_fn, opt_key, config["loss"], float(config["tau"]))
  rng = jax.random.PRNGKey(int(config["seed"]))
  state = create_train_state(init_params(model.params, model.dim, int(config["head_dim"]), rng), tx)

  def run_eval(params):
    return evaluate(eval_fn, params, valid_data, images, model.preprocess, int(config["eval_batch_size"]))

  manager = _checkpoint_manager(workdir)
  start = 0
  if manager.latest_step() is not None:
    import orbax.checkpoint as ocp
    start = int(manager.latest_step())
    if start > steps:
      raise ValueError(f"{workdir} holds a checkpoint at step {start}, past steps={steps}: raise steps or use "
                       "a fresh workdir.")
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    log(f"[train] resumed from step {start} ({workdir}/checkpoints)")
  before = run_eval(state.params) if start == 0 else None

  log_path = os.path.join(workdir, "metrics.jsonl")
  rows = [] if start == 0 else _read_jsonl(log_path, upto=start)
  input_seconds = [0.0]  # Time the producer thread spends making batches: the input pipeline's own speed.

  def produce():
    for idx, sims in input_pipeline.train_batches(train_data, batch_size, int(config["seed"]), start, steps - start):
      t = time.perf_counter()
      x = input_pipeline.triplet_images(idx, images, model.preprocess)
      input_seconds[0] += time.perf_counter() - t
      yield x, sims

  batches = input_pipeline.prefetch(produce())
  every = int(config["log_every"]) or steps
  metrics, first_step_s, t0 = None, None, time.perf_counter()
  with tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True) as bar:
    for step, (x, sims) in enumerate(batches, start + 1):  # A Python counter: reading state.step would sync.
      state, metrics = step_fn(state, x, sims)
      if first_step_s is None:  # The first step includes compilation: keep it out of steps/s.
        jax.block_until_ready(metrics)
        first_step_s = time.perf_counter() - t0
        t1 = time.perf_counter()
      if step % every == 0 or step == steps:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if config["eval_every"] and step % int(config["eval_every"]) == 0 and step < steps:
          row["val_triplet_accuracy"] = run_eval(state.params)["triplet_accuracy"]
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['triplet_accuracy']:.3f}")
      if config["checkpoint_every"] and step % int(config["checkpoint_every"]) == 0 and step < steps:
        _save(manager, state)
      bar.update(1)
  jax.block_until_ready(state)
  trained = steps - start
  seconds = time.perf_counter() - t0
  rate_steps = max(trained - 1, 0)
  steps_per_second = rate_steps / (time.perf_counter() - t1) if rate_steps and first_step_s is not None else 0.0
  if trained and (manager.latest_step() or -1) < steps:
    _save(manager, state)
  manager.wait_until_finished()
  manager.close()

  after = run_eval(state.params)
  with open(log_path, "w") as f:
    f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
  export_student(workdir, state.params, model)

  result = {
      "loss": rows[-1]["loss"] if rows else None,
      "val_loss": after["loss"],
      "val_triplet_accuracy": after["triplet_accuracy"],
      "val_triplets": after["count"],
      "train_triplets": len(train_data),
      "steps": steps,
      "steps_trained": trained,
      "resumed_from": start,
      "batch_size": batch_size,
      "steps_per_second": round(steps_per_second, 3),
      "images_per_second": round(steps_per_second * batch_size * 3, 1),
      "input_images_per_second": round(trained * batch_size * 3 / input_seconds[0], 1) if input_seconds[0] else None,
      "first_step_seconds": round(first_step_s or 0.0, 2),
      "train_seconds": round(seconds, 2),
      "student": model.config.get("name", config["student"]),
  }
  if before is not None:
    result["val_loss_before"] = before["loss"]
    result["val_triplet_accuracy_before"] = before["triplet_accuracy"]
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
    f.write("\n")
  log(f"[train] val triplet accuracy {result.get('val_triplet_accuracy_before', float('nan')):.3f} -> "
      f"{result['val_triplet_accuracy']:.3f}; {result['steps_per_second']:.2f} steps/s")
  return result


def _read_jsonl(path: str, upto: int) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, f) if r["step"] <= upto]


def export_student(workdir: str, params: Mapping[str, Any], model: Any) -> str:
  """Write the fine-tuned encoder as `student.npz` (+ `student.json`); returns its load_model spec."""
  from alignet_data import models

  name = model.config.get("name")
  path = os.path.join(workdir, "student.npz")
  models.save_checkpoint(path, jax.tree.map(np.asarray, params["encoder"]))
  if "head" in params:
    head = jax.tree.map(np.asarray, params["head"])
    with open(os.path.join(workdir, "triplet_head.npz"), "wb") as f:
      np.savez(f, kernel=head["kernel"], bias=head["bias"])
  info = {"model": name, "model_config": dict(model.config), "checkpoint": "student.npz",
          "head": "triplet_head.npz" if "head" in params else None,
          "representation": "encoder (embed_fn); the triplet head, if any, is saved separately"}
  with open(os.path.join(workdir, "student.json"), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
    f.write("\n")
  return f"{name}:{path}"


def load_student(train_url: str) -> Any:
  """The fine-tuned encoder of a train artifact (or workdir) as a `models.LoadedModel`, from student.json."""
  from alignet_data import models

  art = artifacts.try_load(train_url)
  if art is not None:
    info, path = art.read_json("student.json"), art.path("student.npz")
  else:  # A bare workdir of train_and_evaluate (no manifest).
    fs, root = artifacts.url_to_fs(train_url)
    student_json = artifacts.join(root, "student.json")
    if not fs.isfile(student_json):
      raise FileNotFoundError(f"{train_url} has no student.json: is it a train artifact (run `alignet train`)?")
    with fs.open(student_json, "rb") as f:
      info = json.loads(f.read())
    path = artifacts.join(train_url, info["checkpoint"])
  return models.from_checkpoint(info["model_config"], path, prefix="")
