"""A released-style TF SavedModel (serving_default: images f32[B,224,224,3] in [0, 1] -> pre_logits) loads,
embeds like a hand computation, and runs through `evaluate`."""
import numpy as np
import pytest
from conftest import tiny_world

from alignet_data import artifacts, demo_world
from pipelines import evaluate_stage


def _run(config, out):
  config = {**evaluate_stage.default_config(), "bootstrap": 20, **config}
  return artifacts.run_stage("evaluate", out, config, evaluate_stage.input_urls(config),
                             lambda w: evaluate_stage.run(config, w), log=lambda _: None)


def _export_savedmodel(path, dim=8, output="pre_logits"):
  """A tiny TF model with the released signature: mean colour of 4x4 blocks -> a linear map to `dim`."""
  import tensorflow as tf

  class Tiny(tf.Module):
    def __init__(self):
      super().__init__()
      self.w = tf.Variable(np.random.default_rng(0).normal(size=(4 * 4 * 3, dim)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32, name="images")])
    def serve(self, images):
      pooled = tf.nn.avg_pool2d(images, 56, 56, "VALID")
      return {output: tf.reshape(pooled, [-1, 48]) @ self.w}

  model = Tiny()
  tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})
  return model.w.numpy()


def test_savedmodel_with_the_released_signature_loads_and_evaluates(tmp_path):
  from alignet_data.evaluation import savedmodel
  from alignet_data.models import preprocessing

  w = _export_savedmodel(tmp_path / "sm")
  enc = savedmodel.load(str(tmp_path / "sm"))
  assert enc.dim == 8 and enc.image_size == 224
  world_url = tiny_world(tmp_path, 5)  # few images: each is resized to 224 px
  world = demo_world.load(world_url)
  images = world.things_images[:5]
  x = preprocessing.preprocess(images, 224, "student")  # cubic resize to 224, values in [0, 1]
  assert x.shape == (5, 224, 224, 3) and 0 <= x.min() and x.max() <= 1
  expected = x.reshape(5, 4, 56, 4, 56, 3).mean((2, 4)).reshape(5, 48) @ w
  np.testing.assert_allclose(enc.embed(images, batch_size=2), expected, rtol=1e-4, atol=1e-4)

  report = _run({"world": world_url, "models": {"released": f"savedmodel:{tmp_path / 'sm'}"}, "batch_size": 64,
                 "probe": {"shots": []}}, str(tmp_path / "e")).report
  assert report["models"]["released"]["kind"] == "model" and report["models"]["released"]["dim"] == 8
  assert report["things"]["n"] == 80 and set(report["levels"]["released"]) >= {"coarse", "fine", "boundary"}

  _export_savedmodel(tmp_path / "bad", output="logits")
  with pytest.raises(ValueError, match="pre_logits"):
    savedmodel.load(str(tmp_path / "bad"))
