"""Hugging Face SigLIP layout: our name map + Flax ViT == `transformers`' SiglipVisionModel (PyTorch, CPU).

Random weights of a small SigLIP-shaped config pin down what real checkpoints rely on: the MAP head, layer norms
(eps 1e-6), the tanh GELU, the position embeddings and the patch conv layout. Needs the test-only extra
(torch, transformers, safetensors); skipped where it is absent.
"""
import numpy as np
import pytest

from alignet_data import models
from alignet_data.models import checkpoints, hf_siglip

SMALL = {"name": "siglip-small", "patch_size": 8, "image_size": 32, "width": 32, "depth": 2, "mlp_dim": 48,
         "num_heads": 4, "pool_type": "map", "head_zeroinit": False, "preprocessing": "siglip"}


def _images(n: int, size: int = 32) -> np.ndarray:
  return np.random.default_rng(3).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A SiglipVisionModel with every tensor random (no all-ones norms, no zero biases), saved by transformers."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.SiglipVisionConfig(
      hidden_size=SMALL["width"], intermediate_size=SMALL["mlp_dim"], num_hidden_layers=SMALL["depth"],
      num_attention_heads=SMALL["num_heads"], image_size=SMALL["image_size"], patch_size=SMALL["patch_size"])
  model = transformers.SiglipVisionModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "post_layernorm.weight")) else 0
      p.copy_(base + 0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("hf") / "siglip"
  model.save_pretrained(path)
  return model, str(path / "model.safetensors")


def test_flax_model_equals_transformers_siglip_on_mapped_weights(hf_model):
  import torch
  model, path = hf_model
  ours = models.from_checkpoint(SMALL, path)
  assert ours.config["num_classes"] is None  # SigLIP's image tower has no `head`: the MAP output is the embedding.
  x = ours.preprocess(_images(5))  # [-1, 1], NHWC: the same pixels go to both models.
  assert x.min() < -0.9 and x.max() > 0.9
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
  got = np.asarray(ours.embed_fn(ours.params, x))
  assert got.shape == ref.shape == (5, SMALL["width"])
  rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
  assert rel.max() < 1e-4, rel


def test_name_map_inverts_and_our_safetensors_files_read_like_the_reference(hf_model, tmp_path):
  from safetensors.numpy import load_file
  model, path = hf_model
  reference = load_file(path)
  ours = hf_siglip.read_safetensors(path)
  assert ours.keys() == reference.keys() and all(np.array_equal(ours[k], reference[k]) for k in ours)
  flat = hf_siglip.to_big_vision(ours, num_heads=SMALL["num_heads"])
  assert hf_siglip.find_prefix(ours) == ""
  back = hf_siglip.from_big_vision(flat, prefix="")
  assert back.keys() == reference.keys() and all(np.array_equal(back[k], reference[k]) for k in back)
  # Our writer: readable by the reference reader, byte-deterministic, and SiglipModel's "vision_model." prefix.
  hf_siglip.write_safetensors(str(tmp_path / "a.safetensors"), hf_siglip.from_big_vision(flat))
  hf_siglip.write_safetensors(str(tmp_path / "b.safetensors"), hf_siglip.from_big_vision(flat))
  assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
  again = load_file(str(tmp_path / "a.safetensors"))
  assert all(np.array_equal(again["vision_model." + k], reference[k]) for k in reference)


@pytest.fixture(scope="module")
def small_model():
  return models.build(SMALL, seed=4)


def test_safetensors_round_trip_gives_the_same_embeddings_without_torch(small_model):
  m = small_model
  url = "memory://hf_parity_test/siglip.safetensors"
  extra = {"text_model.embeddings.token_embedding.weight": np.ones((7, 32), np.float32),
           "logit_scale": np.zeros((1,), np.float32)}  # A two-tower SiglipModel file: the text tower is ignored.
  hf_siglip.write_safetensors(url, {**hf_siglip.from_big_vision(checkpoints.flatten(m.params)), **extra})
  loaded = models.from_checkpoint(SMALL, url)
  images = _images(3)
  np.testing.assert_array_equal(loaded.embed(images), m.embed(images))


def test_safetensors_without_a_vision_tower_or_missing_tensors_fail_clearly(small_model):
  m = small_model
  hf = hf_siglip.from_big_vision(checkpoints.flatten(m.params))
  url = "memory://hf_parity_test/bad.safetensors"
  hf_siglip.write_safetensors(url, {"text_model.x": np.zeros(2, np.float32)})
  with pytest.raises(models.CheckpointMismatchError, match="No SigLIP vision tower"):
    models.from_checkpoint(SMALL, url)
  del hf["vision_model.encoder.layers.1.mlp.fc2.bias"]
  hf_siglip.write_safetensors(url, hf)
  with pytest.raises(models.CheckpointMismatchError, match="lacks vision_model.encoder.layers.1.mlp.fc2.bias"):
    models.from_checkpoint(SMALL, url)
  hf = hf_siglip.from_big_vision(checkpoints.flatten(m.params))
  hf_siglip.write_safetensors(url, hf)
  with pytest.raises(models.CheckpointMismatchError, match="mis-shaped: Transformer/encoderblock_0/MlpBlock_0"):
    models.from_checkpoint({**SMALL, "mlp_dim": 64}, url)
