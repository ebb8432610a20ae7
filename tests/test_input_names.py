"""Names that become file names are names (issue 12, "Names are names"): `triplets --npz-sampling`, its strategy
tags and split, and `embed --source NAME=SPEC` are checked by `checks.check_name` before any work, exit 1."""
import numpy as np
import pytest

from alignet_data import artifacts
from alignet_data.teacher import embeddings
from pipelines import cli
from pipelines import triplets_pipeline as tp


def _cli(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  return code, capsys.readouterr().err


@pytest.fixture()
def emb(tmp_path):
  def fn(writer):
    n = 30
    entry = embeddings.write_split(writer, "pool", np.arange(n), np.arange(n) % 3, [f"{i}.png" for i in range(n)],
                                   np.random.default_rng(0).normal(size=(n, 4)), ids_per_shard=30)
    embeddings.write_index(writer, {"pool": entry})
    return {}
  return artifacts.run_stage("embed", str(tmp_path / "emb"), {}, {}, fn, log=lambda _: None).url


def _written(root):
  """Every file under root, relative (what a refused command must not add to)."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("tag", ["x/../../../../ESCAPED", "../ESCAPED", "a/b", ".hidden", "..", "a b"])
def test_triplets_refuses_a_path_as_npz_sampling_tag(tmp_path, emb, capsys, tag):
  """The issue's reproduction: `--npz-sampling 'x/../../../../ESCAPED'` wrote outside the artifact, exit 0."""
  (tmp_path / "work").mkdir()
  before = _written(tmp_path)
  code, err = _cli(capsys, "triplets", "--embeddings", emb, "--strategy", "random", "--num", 10, "--num-valid", 0,
                   "--num-shards", 1, "--format", "npz", "--npz-sampling", tag, "--out", tmp_path / "work" / "X")
  assert code == 1 and "--npz-sampling" in err and repr(tag) in err
  assert _written(tmp_path) == before  # Refused before any work: no artifact, no staging, no lock, no ESCAPED.


def test_triplets_accepts_a_plain_npz_sampling_tag(tmp_path, emb):
  config = tp.default_config() | {"embeddings": emb, "strategy": "random", "num": 10, "num_valid": 0,
                                  "num_shards": 1, "formats": ["npz"], "npz_sampling": "my_tag-1.0"}
  art = artifacts.run_stage("triplets", str(tmp_path / "X"), config, tp.input_urls(config),
                            lambda w: tp.run(config, w), log=lambda _: None)
  assert art.report["npz"] == {"train_my_tag-1.0": "npz/untransformed/train_my_tag-1.0.npz"}


@pytest.mark.parametrize(("flags", "says"), [
    (["--strategy", "random/../x"], "Unknown sampling strategy"),
    (["--strategy", "random:nan"], "non-negative"),
    (["--split", "../pool"], "--split"),
])
def test_triplets_refuses_bad_strategy_tags_and_splits_before_any_work(tmp_path, emb, capsys, flags, says):
  before = _written(tmp_path)
  code, err = _cli(capsys, "triplets", "--embeddings", emb, "--num", 10, "--num-valid", 0, "--num-shards", 1,
                   *flags, "--out", tmp_path / "X")
  assert code == 1 and says in err
  assert _written(tmp_path) == before


@pytest.mark.parametrize("name", ["a/../b", "..", ".x", "my-split", "a b", ""])
def test_embed_refuses_a_bad_split_name_before_any_work(tmp_path, capsys, name):
  (tmp_path / "imgs").mkdir()
  before = _written(tmp_path)
  code, err = _cli(capsys, "embed", "--source", f"{name}=files:{tmp_path}/imgs/*.png", "--out", tmp_path / "E")
  assert code == 1 and err.startswith("alignet embed: error:") and "split name" in err and repr(name) in err
  assert _written(tmp_path) == before


def test_embed_config_names_are_checked_by_input_urls():
  """`alignet run` (the chain) passes configs, not flags: the same check runs before any input is read."""
  from pipelines import embed_pipeline
  config = embed_pipeline.default_config() | {"sources": {"../up": "files:/nowhere/*.png"}}
  with pytest.raises(ValueError, match="split name"):
    embed_pipeline.input_urls(config)
  assert embed_pipeline.parse_source_flags(["train_2=files:/a/*.png"]) == {"train_2": "files:/a/*.png"}
