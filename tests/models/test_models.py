"""ViT models: big_vision layout, checkpoints, configs and preprocessing conventions."""
import fsspec
import jax
import numpy as np
import pytest

from alignet_data import models
from alignet_data.models import checkpoints, hf_siglip, preprocessing

TINY = {"name": "tiny", "patch_size": 8, "image_size": 16, "width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 2,
        "preprocessing": "student"}


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_models():
  """One freshly built tiny model per pool type (init compiles are the slow part: build each once)."""
  return {pool: models.build({**TINY, "pool_type": pool, "num_classes": 5}) for pool in ("gap", "tok", "map")}


@pytest.mark.parametrize("pool_type", ["gap", "tok", "map"])
def test_tiny_config_gives_batch_by_dim_embeddings(tiny_models, pool_type):
  m = tiny_models[pool_type]
  emb = m.embed(_images(3))
  assert emb.shape == (3, m.dim) == (3, 16)
  assert emb.dtype == np.float32 and np.isfinite(emb).all()
  assert len(np.unique(emb.round(5), axis=0)) == 3  # Different images, different embeddings.
  assert m.params["pos_embedding"].shape == (1, 4, 16)  # (16 / 8)^2 patches; cls is NOT in the posemb.
  assert ("cls" in m.params) == (pool_type == "tok")
  assert ("MAPHead_0" in m.params) == (pool_type == "map")
  assert m.params["head"]["kernel"].shape == (16, 5)


def test_embed_fn_is_pure_and_jittable_and_equals_pre_logits(tiny_models):
  m = tiny_models["map"]
  x = m.preprocess(_images(4))
  logits, out = jax.jit(m.apply)(m.params, x)
  assert logits.shape == (4, 5)
  np.testing.assert_allclose(jax.jit(m.embed_fn)(m.params, x), out["pre_logits"], atol=1e-5)
  np.testing.assert_allclose(m.embed(_images(4)), out["pre_logits"], atol=1e-5)


def test_checkpoint_round_trip_gives_identical_embeddings_and_bytes(tiny_models):
  m = tiny_models["gap"]
  models.save_checkpoint("memory://models_test/a.npz", m.params)
  models.save_checkpoint("memory://models_test/b.npz", m.params)
  fs = fsspec.filesystem("memory")
  assert fs.cat("/models_test/a.npz") == fs.cat("/models_test/b.npz")  # Deterministic bytes.
  loaded = models.from_checkpoint(TINY, "memory://models_test/a.npz")
  assert loaded.config["num_classes"] == 5  # Taken from the checkpoint's head.
  images = _images(5, seed=1)
  np.testing.assert_array_equal(loaded.embed(images), m.embed(images))
  flat = checkpoints.load_flat("memory://models_test/a.npz")
  assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" in flat


def test_load_model_spec_is_config_name_then_checkpoint_url():
  demo = models.load_model("demo-student")
  models.save_checkpoint("memory://models_test/student.npz", demo.params)
  m = models.load_model("vit-demo-student:memory://models_test/student.npz")
  assert m.config == demo.config and m.dim == demo.dim == 64
  images = _images(2, size=32)
  np.testing.assert_array_equal(m.embed(images), demo.embed(images))


def test_misfitting_checkpoint_names_missing_unexpected_and_misshaped_params(tiny_models):
  params = jax.tree.map(np.asarray, tiny_models["gap"].params)
  del params["Transformer"]["encoder_norm"]["scale"]
  params["extra"] = {"w": np.zeros(3, np.float32)}
  models.save_checkpoint("memory://models_test/bad.npz", params)
  with pytest.raises(models.CheckpointMismatchError) as e:
    models.from_checkpoint({**TINY, "mlp_dim": 64}, "memory://models_test/bad.npz")
  msg = str(e.value)
  assert "missing (1): Transformer/encoder_norm/scale" in msg
  assert "unexpected (1): extra/w" in msg
  assert "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: checkpoint (16, 32) vs config (16, 64)" in msg


def test_siglip_two_tower_checkpoint_loads_image_tower_by_prefix(tiny_models):
  m = tiny_models["map"]
  flat = {f"params/img/{k}": v for k, v in checkpoints.flatten(m.params).items()}
  flat["params/img/head/kernel"] = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)  # Not zero.
  flat["params/txt/Embed_0/embedding"] = np.zeros((10, 16), np.float32)
  flat["params/t"] = np.zeros((1,), np.float32)
  models.save_checkpoint("memory://models_test/siglip.npz", checkpoints.unflatten(flat))
  loaded = models.from_checkpoint({**TINY, "pool_type": "map", "representation": "l2_logits"},
                                  "memory://models_test/siglip.npz")
  emb = loaded.embed(_images(2))
  assert emb.shape == (2, 5) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_a_map_head_is_never_dropped_into_a_gap_config(tiny_models):
  """Before: a two-tower checkpoint's extra image-tower parameters were ignored, so a MAP head vanished."""
  flat = {f"params/img/{k}": v for k, v in checkpoints.flatten(tiny_models["map"].params).items()}
  models.save_checkpoint("memory://models_test/map.npz", checkpoints.unflatten(flat))
  with pytest.raises(models.CheckpointMismatchError) as e:
    models.from_checkpoint({**TINY, "pool_type": "gap"}, "memory://models_test/map.npz")
  msg = str(e.value)
  assert "unexpected (" in msg and "MAPHead_0/probe" in msg and "MAPHead_0/LayerNorm_0/scale" in msg
  assert "pool_type='map'" in msg
  # Anything else inside the image tower too; only what lies outside it (named in an INFO line) is left out.
  flat = {f"params/img/{k}": v for k, v in checkpoints.flatten(tiny_models["gap"].params).items()}
  flat["params/img/adapter/kernel"] = np.zeros((16, 4), np.float32)
  models.save_checkpoint("memory://models_test/extra.npz", checkpoints.unflatten(flat))
  with pytest.raises(models.CheckpointMismatchError, match=r"unexpected \(1\): adapter/kernel"):
    models.from_checkpoint(TINY, "memory://models_test/extra.npz")


def test_a_vision_tensor_the_hf_name_map_does_not_use_is_an_error(tiny_models):
  hf = hf_siglip.from_big_vision(checkpoints.flatten(tiny_models["map"].params))
  hf["vision_model.head.extra_norm.weight"] = np.ones(16, np.float32)
  hf["vision_model.embeddings.position_ids"] = np.arange(4)[None]  # A buffer older transformers saved: fine.
  url = "memory://models_test/extra.safetensors"
  hf_siglip.write_safetensors(url, hf)
  with pytest.raises(models.CheckpointMismatchError, match=r"1 vision-tower tensor\(s\) .* would be dropped: "
                                                           r"vision_model\.head\.extra_norm\.weight$"):
    models.from_checkpoint({**TINY, "pool_type": "map"}, url)


def test_so400m_14_has_big_vision_names_and_shapes():
  params = models.abstract_params(models.get_config("so400m/14"))
  shapes = checkpoints.flatten_shapes(params)
  assert shapes["embedding/kernel"] == (14, 14, 3, 1152)
  assert shapes["pos_embedding"] == (1, 256, 1152)  # (224 / 14)^2, learned.
  blocks = {k.split("/")[1] for k in shapes if k.startswith("Transformer/encoderblock_")}
  assert blocks == {f"encoderblock_{i}" for i in range(27)}
  b = "Transformer/encoderblock_26/"
  assert shapes[b + "MlpBlock_0/Dense_0/kernel"] == (1152, 4304)
  assert shapes[b + "MultiHeadDotProductAttention_0/query/kernel"] == (1152, 16, 72)
  assert shapes[b + "MultiHeadDotProductAttention_0/out/kernel"] == (16, 72, 1152)
  assert shapes[b + "LayerNorm_1/scale"] == (1152,)
  assert shapes["Transformer/encoder_norm/bias"] == (1152,)
  assert shapes["MAPHead_0/probe"] == (1, 1, 1152)
  assert shapes["MAPHead_0/MlpBlock_0/Dense_1/kernel"] == (4304, 1152)
  assert "cls" not in shapes and "head/kernel" not in shapes
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert 4.0e8 < n < 4.4e8  # "So400m".
  assert models.abstract_params(models.get_config("so400m/14-384"))["pos_embedding"].shape == (1, 729, 1152)


def test_model_specs_without_checkpoint_or_with_unknown_config_fail_clearly():
  with pytest.raises(ValueError, match="names no checkpoint"):
    models.load_model("so400m/14")
  with pytest.raises(KeyError, match="Available configs"):
    models.load_model("vit-huge/3:/tmp/x.npz")
  with pytest.raises(ValueError, match="smaller than patch_size"):
    models.get_config("vit-demo-student", image_size=4)


def test_preprocessing_conventions_value_ranges_and_sizes():
  images = _images(2, size=32)
  images[0, 0, 0] = [0, 255, 128]
  siglip = preprocessing.preprocess(images, 32, "siglip")
  student = preprocessing.preprocess(images, 32, "student")
  # Same size: pixels pass through untouched, only the value range differs.
  np.testing.assert_allclose(siglip, images / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_allclose(student, images / 255.0, atol=1e-6)
  assert siglip[0, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1.0], abs=1e-6)
  for size in (16, 48):  # Down and up, straight to the square size (no crop).
    for conv, (lo, hi) in [("siglip", (-1, 1)), ("student", (0, 1))]:
      out = preprocessing.preprocess(images, size, conv)
      assert out.shape == (2, size, size, 3) and out.dtype == np.float32
      assert out.min() >= lo and out.max() <= hi
  # Bilinear and cubic differ on upsampling (the conventions are not interchangeable).
  up_bilinear = preprocessing.preprocess(images, 48, "siglip") * 0.5 + 0.5
  up_cubic = preprocessing.preprocess(images, 48, "student")
  assert np.abs(up_bilinear - up_cubic).max() > 0.01
  assert preprocessing.preprocess(images[0], 32, "student").shape == (1, 32, 32, 3)  # Single HWC image.


def test_preprocessing_rejects_non_uint8_and_unknown_conventions():
  with pytest.raises(ValueError, match="uint8"):
    preprocessing.preprocess(np.zeros((1, 8, 8, 3), np.float32), 8, "student")
  with pytest.raises(ValueError, match="convention"):
    preprocessing.make_preprocess(8, "imagenet")
  m = models.load_model("demo-teacher")
  assert m.preprocess(_images(1, size=32)).min() < 0  # The demo teacher follows SigLIP's [-1, 1].


def test_scanned_big_vision_checkpoint_loads_like_the_per_layer_one(tiny_models):
  m = models.build({**TINY, "depth": 3, "pool_type": "map"}, seed=2)
  flat = checkpoints.flatten(m.params)
  scanned = {k: v for k, v in flat.items() if not k.startswith("Transformer/encoderblock_")}
  for rest in {k.split("/", 2)[2] for k in flat if k.startswith("Transformer/encoderblock_0/")}:
    scanned[f"params/img/Transformer/encoderblock/{rest}"] = np.stack(
        [flat[f"Transformer/encoderblock_{i}/{rest}"] for i in range(3)])  # big_vision scan=True: depth axis first.
  scanned = {(k if k.startswith("params/img/") else f"params/img/{k}"): v for k, v in scanned.items()}
  models.save_checkpoint("memory://models_test/scanned.npz", checkpoints.unflatten(scanned))
  loaded = models.from_checkpoint({**TINY, "depth": 3, "pool_type": "map"}, "memory://models_test/scanned.npz")
  np.testing.assert_array_equal(loaded.embed(_images(2)), m.embed(_images(2)))


def test_position_embeddings_are_resampled_to_a_new_resolution(tiny_models):
  m = tiny_models["gap"]  # 16 px / patch 8: a 2x2 grid.
  models.save_checkpoint("memory://models_test/lowres.npz", m.params)
  hi = models.from_checkpoint({**TINY, "image_size": 32, "num_classes": 5}, "memory://models_test/lowres.npz")
  pe = np.asarray(hi.params["pos_embedding"])
  assert pe.shape == (1, 16, 16)  # 4x4 grid.
  old = np.asarray(m.params["pos_embedding"]).reshape(2, 2, 16)
  grid = pe.reshape(4, 4, 16)
  np.testing.assert_allclose(grid[[0, 0, -1, -1], [0, -1, 0, -1]], old.reshape(4, 16), rtol=1e-6)  # Corners kept.
  assert hi.embed(_images(2, size=32)).shape == (2, 16)
  with pytest.raises(models.CheckpointMismatchError, match="mis-shaped: pos_embedding"):
    models.from_checkpoint({**TINY, "image_size": 32, "num_classes": 5}, "memory://models_test/lowres.npz",
                           resample_posemb=False)
  with pytest.raises(models.CheckpointMismatchError, match="Cannot resample pos_embedding"):
    checkpoints.resample_posemb(np.zeros((1, 6, 16)), (1, 16, 16))


@pytest.mark.parametrize("method", ["bilinear", "cubic"])
def test_numpy_resize_matches_jax_image_resize(method):
  x = np.random.default_rng(5).random((2, 37, 23, 3)).astype(np.float32)
  for size in (1, 8, 16, 23, 37, 50):
    want = np.asarray(jax.image.resize(x, (2, size, size, 3), method=method, antialias=False))
    np.testing.assert_allclose(preprocessing.resize(x, size, method), want, atol=1e-5, err_msg=str(size))
