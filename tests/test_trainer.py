"""Trainer: decay to init, the input pipeline's order, and a few real steps on a tiny synthetic shard artifact."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignet_data import artifacts, models, triplet_math
from trainer import input_pipeline, train

N_CLASSES, PER_CLASS, SIZE = 6, 10, 16


def _images() -> tuple[np.ndarray, np.ndarray]:
  """Flat-coloured 16 px images, one colour per class, a little pixel noise."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
  colours = rng.integers(0, 256, (N_CLASSES, 3))
  images = colours[labels][:, None, None, :] + rng.integers(-20, 21, (len(labels), SIZE, SIZE, 3))
  return np.clip(images, 0, 255).astype(np.uint8), labels


def _write_split(writer, split: str, n: int, labels: np.ndarray, seed: int) -> None:
  rng = np.random.default_rng(seed)
  trip = np.stack([rng.choice(len(labels), 3, replace=False) for _ in range(n)])
  onehot = np.eye(N_CLASSES)[labels] * 2.0  # teacher: same class -> similarity 4, else 0
  trip, sims = triplet_math.order_by_similarity(trip, triplet_math.triplet_similarities(onehot, trip))
  for i, rows in enumerate(np.array_split(np.arange(n), 2)):
    table = pa.table({
        "triplet_id": pa.array(rows, pa.int64()),
        "indices": pa.array(trip[rows].tolist(), pa.list_(pa.int64())),
        "similarities": pa.array(sims[rows].astype(np.float32).tolist(), pa.list_(pa.float32())),
    })
    with writer.open(f"shards/{split}-{i:05d}-of-00002.parquet", "wb") as f:
      pq.write_table(table, f)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  _, labels = _images()
  out = str(tmp_path_factory.mktemp("art") / "triplets")

  def fn(writer):
    _write_split(writer, "train", 256, labels, 1)
    _write_split(writer, "valid", 64, labels, 2)
    return {}
  return artifacts.run_stage("triplets", out, {"test": 1}, {}, fn, log=lambda _: None).url


@pytest.fixture(scope="module")
def tiny_model():
  cfg = models.get_config("vit-demo-student", image_size=SIZE, width=16, depth=1, mlp_dim=32, num_heads=2)
  return models.build(cfg)


CONFIG = {"steps": 8, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 2, "eval_batch_size": 64,
          "log_every": 2, "tau": 1.0, "seed": 0}


def test_decay_to_init_pulls_params_back_with_zero_gradient():
  init = {"w": jnp.array([1.0, -2.0, 0.5])}
  tx = optax.chain(optax.scale_by_adam(), train.decay_to_init(1.0), optax.scale_by_learning_rate(0.1))
  state = tx.init(init)
  moved = {"w": init["w"] + jnp.array([0.5, -1.0, 0.0])}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, moved), state, moved)
  after = optax.apply_updates(moved, updates)
  before_dist = float(jnp.linalg.norm(moved["w"] - init["w"]))
  after_dist = float(jnp.linalg.norm(after["w"] - init["w"]))
  assert after_dist == pytest.approx(0.9 * before_dist, rel=1e-5)  # lr 0.1 x weight 1.0: 10% of the way back


def test_full_optimizer_decays_to_init_and_respects_warmup():
  init = {"w": jnp.ones(4)}
  moved = {"w": jnp.full(4, 3.0)}
  zero = {"w": jnp.zeros(4)}
  cfg = {**train.DEFAULTS, "steps": 100, "learning_rate": 0.1, "warmup_steps": 0}
  tx = train.make_optimizer(cfg)
  updates, _ = tx.update(zero, tx.init(init), moved)
  assert float(jnp.abs(optax.apply_updates(moved, updates)["w"] - 1.0).max()) < 2.0
  tx = train.make_optimizer({**cfg, "warmup_steps": 10})  # learning rate 0 at step 0: nothing moves
  updates, _ = tx.update(zero, tx.init(init), moved)
  np.testing.assert_array_equal(optax.apply_updates(moved, updates)["w"], moved["w"])


def test_batches_are_a_function_of_seed_and_step(shards):
  data = input_pipeline.read_triplets(artifacts.load(shards), "train")
  assert data.indices.shape == (256, 3) and data.similarities.dtype == np.float32
  straight = list(input_pipeline.train_batches(data, 32, seed=3, num_steps=20))
  resumed = list(input_pipeline.train_batches(data, 32, seed=3, start_step=13, num_steps=7))
  for (a, _), (b, _) in zip(straight[13:], resumed, strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight[9][0], data.indices[input_pipeline.batch_rows(256, 32, 3, 9)])
  epoch0 = np.concatenate([b[0] for b in straight[:8]])  # one epoch = every triplet once
  assert sorted(map(tuple, epoch0)) == sorted(map(tuple, data.indices))
  assert not np.array_equal(straight[0][0], straight[8][0])  # a new order each epoch


def test_bad_indices_and_missing_shards_fail_clearly(shards):
  data = input_pipeline.read_triplets(artifacts.load(shards), "valid")
  with pytest.raises(ValueError, match="image source has 10 images"):
    input_pipeline.check_indices(data, input_pipeline.ArrayImages(np.zeros((10, 4, 4, 3), np.uint8)), "valid")
  with pytest.raises(FileNotFoundError, match="No Parquet shards for split 'test'"):
    input_pipeline.shard_names(artifacts.load(shards), "test")


def test_training_reduces_the_loss_exports_and_resumes(shards, tiny_model, tmp_path):
  images, _ = _images()
  source = input_pipeline.ArrayImages(images)
  cfg = {**CONFIG, "shards": shards, "checkpoint_every": 4}
  out = train.train_and_evaluate(cfg, str(tmp_path / "a"), model=tiny_model, images=source, log=lambda _: None)
  rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert out["val_loss"] < out["val_loss_before"]
  assert out["steps"] == 8 and out["steps_per_second"] > 0
  assert 0.0 <= out["val_triplet_accuracy"] <= 1.0
  assert json.load(open(tmp_path / "a" / "metrics.json"))["val_loss"] == out["val_loss"]

  # The export loads back as a model whose representation is the fine-tuned one.
  student = train.load_student(str(tmp_path / "a"))
  x = tiny_model.preprocess(images[:4])
  assert not np.allclose(student.embed_fn(student.params, x), tiny_model.embed_fn(tiny_model.params, x))
  assert json.load(open(tmp_path / "a" / "student.json"))["model"] == "vit-demo-student"

  # A run killed after its step-4 checkpoint, rerun: it resumes there and ends with the same parameters.
  shutil.copytree(tmp_path / "a" / "checkpoints" / "4", tmp_path / "b" / "checkpoints" / "4")
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "b"), model=tiny_model, images=source, log=lambda _: None)
  assert resumed["resumed_from"] == 4 and resumed["steps_trained"] == 4
  a = models.load_checkpoint(str(tmp_path / "a" / "student.npz"))
  b = models.load_checkpoint(str(tmp_path / "b" / "student.npz"))
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(leaf_a, leaf_b)


def test_train_stage_flags_override_defaults_and_name_inputs():
  import argparse

  from trainer import main
  parser = argparse.ArgumentParser()
  main.add_arguments(parser)
  args = parser.parse_args(["--shards", "runs/x/triplets", "--world", "runs/x/world", "--steps", "12",
                            "--learning-rate", "1e-4", "--student", "vit-demo-student:ckpt/s.npz"])
  config = main.config_from_args(args)
  assert main.STAGE == "train"
  assert config["steps"] == 12 and config["learning_rate"] == 1e-4 and config["tau"] == 100.0
  assert config["decay_to_init"] == train.DEFAULTS["decay_to_init"]  # unset flags keep the defaults
  assert main.input_urls(config) == {"shards": "runs/x/triplets", "world": "runs/x/world", "student": "ckpt/s.npz"}
  json.dumps(config)  # configs are data


def test_triplet_head_maps_the_representation_to_head_dim(tiny_model):
  params = train.init_params(tiny_model.params, tiny_model.dim, 8, jax.random.PRNGKey(0))
  x = tiny_model.preprocess(_images()[0][:5])
  z = train.make_represent(tiny_model.embed_fn)(params, x)
  assert z.shape == (5, 8)
  no_head = train.init_params(tiny_model.params, tiny_model.dim, 0, jax.random.PRNGKey(0))
  np.testing.assert_allclose(train.make_represent(tiny_model.embed_fn)(no_head, x),
                             tiny_model.embed_fn(tiny_model.params, x), rtol=1e-6)
