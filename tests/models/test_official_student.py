"""The official AligNet student, `siglip-b/16`: SigLIP B/16's image tower (MAP pooling), the trainer's [0, 1]
OpenCV-cubic images and a Dense(1024) lecun-normal triplet head. Checkpoints here are tiny and random, written in
big_vision's two-tower layout (as `webli_en_b16_224_63724782.npz`) and Hugging Face's (`model.safetensors`)."""
import logging

import numpy as np
import pytest

from alignet_data import models
from alignet_data.models import checkpoints, hf_siglip
from trainer import train

# siglip-b/16 shrunk (same patch 16, MAP head and preprocessing), small enough to build in a second.
SHRINK = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 4, "image_size": 32}


def _images(n: int) -> np.ndarray:
  return np.random.default_rng(7).integers(0, 256, (n, 45, 38, 3), dtype=np.uint8)  # Resized to 32 x 32.


def test_siglip_b16_is_the_released_student_shape():
  cfg = models.get_config("siglip-b/16")
  assert (cfg["patch_size"], cfg["image_size"], cfg["width"], cfg["depth"], cfg["mlp_dim"], cfg["num_heads"]) == (
      16, 224, 768, 12, 3072, 12)
  assert (cfg["pool_type"], cfg["preprocessing"], cfg["representation"]) == ("map", "student", "pre_logits")
  assert (cfg["triplet_head"], cfg["triplet_head_init"]) == (1024, "lecun_normal")
  assert train.head_size(-1, cfg) == 1024 and train.head_size(0, cfg) == 0  # --head-dim still overrides.
  shapes = checkpoints.flatten_shapes(models.abstract_params(cfg))
  assert shapes["pos_embedding"] == (1, 196, 768) and shapes["embedding/kernel"] == (16, 16, 3, 768)
  assert shapes["MAPHead_0/probe"] == (1, 1, 768)
  assert shapes["MAPHead_0/MultiHeadDotProductAttention_0/query/kernel"] == (768, 12, 64)
  assert shapes["MAPHead_0/MlpBlock_0/Dense_0/kernel"] == (768, 3072)
  assert "head/kernel" not in shapes and "cls" not in shapes  # SigLIP's image tower: the MAP output is the embedding.
  assert 9.0e7 < sum(int(np.prod(s)) for s in shapes.values()) < 9.6e7  # ViT-B/16 (86M) + MAP head (7M).
  with pytest.raises(ValueError, match="triplet_head_init"):
    models.get_config("siglip-b/16", triplet_head_init="zeros")


@pytest.fixture(scope="module")
def tiny_student():
  return models.build(models.get_config("siglip-b/16", **SHRINK), seed=3)


def _two_tower_npz(params, url: str) -> None:
  """big_vision's released SigLIP layout: scanned image tower under params/img/, text tower, temperature, bias."""
  flat = checkpoints.flatten(params)
  out = {f"params/img/{k}": v for k, v in flat.items() if not k.startswith("Transformer/encoderblock_")}
  depth = SHRINK["depth"]
  for rest in {k.split("/", 2)[2] for k in flat if k.startswith("Transformer/encoderblock_0/")}:
    out[f"params/img/Transformer/encoderblock/{rest}"] = np.stack(
        [flat[f"Transformer/encoderblock_{i}/{rest}"] for i in range(depth)])
  out["params/txt/Embed_0/embedding"] = np.zeros((11, 32), np.float32)
  out["params/txt/head/kernel"] = np.zeros((32, 32), np.float32)
  out["params/t"], out["params/b"] = np.ones((1,), np.float32), np.zeros((1,), np.float32)
  models.save_checkpoint(url, checkpoints.unflatten(out))


def test_big_vision_two_tower_checkpoint_loads_by_spec_and_names_the_ignored_text_tower(tiny_student, caplog):
  url = "memory://official_student/webli_en_b16_224.npz"
  _two_tower_npz(tiny_student.params, url)
  with caplog.at_level(logging.INFO):
    m = models.load_model(f"siglip-b/16:{url}", **SHRINK)
  ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
  assert len(ignored) == 1 and "params/img/" in ignored[0] and url in ignored[0], ignored
  assert "params/txt/ (2 arrays)" in ignored[0] and "params/b" in ignored[0] and "params/t" in ignored[0]
  assert m.config["num_classes"] is None and m.dim == SHRINK["width"]
  images = _images(3)
  emb = m.embed(images)
  assert emb.shape == (3, 32) and np.isfinite(emb).all()
  np.testing.assert_array_equal(emb, tiny_student.embed(images))
  assert 0.0 <= m.preprocess(images).min() and m.preprocess(images).max() <= 1.0  # The student's [0, 1].


def test_hugging_face_siglip_model_file_loads_by_spec(tiny_student, caplog):
  url = "memory://official_student/model.safetensors"
  extra = {"text_model.embeddings.token_embedding.weight": np.ones((7, 32), np.float32),
           "logit_scale": np.zeros((1,), np.float32), "logit_bias": np.zeros((1,), np.float32)}
  hf_siglip.write_safetensors(url, {**hf_siglip.from_big_vision(checkpoints.flatten(tiny_student.params)), **extra})
  with caplog.at_level(logging.INFO):
    m = models.load_model(f"siglip-b/16:{url}", **SHRINK)
  ignored = " ".join(r.getMessage() for r in caplog.records if "ignoring" in r.getMessage())
  assert "text_model." in ignored and "logit_scale" in ignored and "logit_bias" in ignored, ignored
  images = _images(2)
  np.testing.assert_allclose(m.embed(images), tiny_student.embed(images), rtol=1e-6, atol=1e-6)
