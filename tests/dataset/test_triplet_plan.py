"""The triplets plan: sets named as the released trainer names them, with disjoint triplet ids fixed per set."""
import numpy as np
import pytest

from alignet_data import artifacts
from alignet_data.dataset import triplet_blocks, triplet_plan
from alignet_data.teacher import embeddings
from pipelines import triplets_pipeline as tp

VALS = "class_boundary,within_class,between_class"


def _config(**overrides):
  return tp.default_config() | {"embeddings": "unused", "strategy": "cluster_boundary", "num": 1000,
                                "num_valid": 100} | overrides


def test_sets_are_named_by_split_keys_with_disjoint_id_ranges():
  plan = triplet_plan.splits(_config(valid_strategies=VALS), k=20)
  assert list(plan) == ["train_cluster_border_20", "val_class_border", "val_within_class", "val_between_class"]
  assert [(s.role, s.strategy, s.sampling, s.num) for s in plan.values()] == [
      ("train", "cluster_boundary", "cluster_border_20", 1000), ("val", "class_boundary", "class_border", 100),
      ("val", "within_class", "within_class", 100), ("val", "between_class", "between_class", 100)]
  ranges = sorted((s.id_base, s.id_base + s.num) for s in plan.values())
  assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False))
  specs = triplet_plan.shard_specs(plan)
  assert [s[0] for s in specs] == ["train_cluster_border_20"] * 4 + ["val_class_border", "val_within_class",
                                                                    "val_between_class"]


def test_a_validation_set_is_fixed_by_its_strategy_alone():
  base = triplet_plan.splits(_config(valid_strategies=VALS), k=20)["val_between_class"]
  other = triplet_plan.splits(_config(num=5000, valid_strategies="between_class,random"), k=20)["val_between_class"]
  assert other == base  # Another --num, other validation sets: the same ids.
  # The default validation set (the training strategy) is the set of that name asked for explicitly.
  default = triplet_plan.splits(_config(strategy="class_boundary"), k=None)
  assert list(default) == ["train_class_border", "val_class_border"]
  assert default["val_class_border"] == triplet_plan.splits(_config(valid_strategies=VALS), k=20)["val_class_border"]
  # A mix: one validation set of that mix, tagged mixed, ids from 2^40 as before.
  mix = triplet_plan.splits(_config(strategy="random:1, cluster_boundary:2"), k=8)
  assert list(mix) == ["train_mixed", "val_mixed"]
  assert mix["val_mixed"].strategy == "cluster_boundary:2,random:1"
  assert mix["val_mixed"].id_base == triplet_plan.VALID_ID_BASE


def test_npz_sampling_overrides_the_training_tag_and_empty_sets_are_left_out():
  plan = triplet_plan.splits(_config(npz_sampling="cluster_border_500", num_valid=0), k=20)
  assert list(plan) == ["train_cluster_border_500"]
  plan = triplet_plan.splits(_config(npz_sampling="cluster_border_500", valid_strategies=["within_class"]), k=20)
  assert list(plan) == ["train_cluster_border_500", "val_within_class"]


def test_bad_validation_strategies_are_refused():
  with pytest.raises(ValueError, match="Unknown validation strategy 'class_border'"):
    triplet_plan.valid_strategies(_config(valid_strategies="class_border"))
  with pytest.raises(ValueError, match="names a strategy twice"):
    triplet_plan.valid_strategies(_config(valid_strategies="random,random"))
  assert triplet_plan.valid_strategies(_config(valid_strategies="")) is None
  assert triplet_plan.plan_strategies(_config(valid_strategies=VALS)) == [
      "between_class", "class_boundary", "cluster_boundary", "within_class"]


@pytest.mark.parametrize(("source", "expected"), [
    ("tfds:imagenet2012:train", True), ("tfds:imagenet2012:5.1.0:train", True),
    ("tfds:imagenet2012:validation", False), ("tfds:imagenette:train", False),
    ("demo:/w:pool", False), ("files:/data/**/*.JPEG", False), ("", False)])
def test_indices_provenance_says_whether_they_are_imagenet_train_record_indices(tmp_path, source, expected):
  def emb(writer):
    entry = embeddings.write_split(writer, "pool", np.arange(3), np.zeros(3), ["a", "b", "c"],
                                   np.eye(3, dtype=np.float32), ids_per_shard=8, source=source)
    embeddings.write_index(writer, {"pool": entry})
    return {}

  art = artifacts.run_stage("embed", str(tmp_path / "embed"), {}, {}, emb, log=lambda s: None)
  got = triplet_blocks.indices_provenance(art.url, "pool")
  assert got["tfds_imagenet2012_train_order"] is expected and got["source"] == (source or None)
  assert got["note"] and ("released trainer would load other images" in got["note"]) == (not expected and bool(source))
