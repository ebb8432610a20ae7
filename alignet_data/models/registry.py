"""Model loading: a config (data) + a checkpoint (flat npz) -> `LoadedModel`.

Specs accepted by `load_model`:
- "demo-teacher", "demo-student": the committed demo checkpoints (`alignet_data/checkpoints/`);
- "<config-name>:<checkpoint path or URL>", e.g. "so400m/14:gs://bucket/siglip_so400m_224.npz" or the official
  student "siglip-b/16:gs://big_vision/siglip/webli_en_b16_224_63724782.npz" (or a Hugging Face
  `model.safetensors`). Config names contain no ":", so everything after the first ":" is the checkpoint URL.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignet_data.models import batching, checkpoints, configs, hf_siglip, preprocessing
from alignet_data.models.vit import ViT

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
# Named models: spec -> (config name, checkpoint file in CHECKPOINT_DIR).
DEMO_MODELS = {
    "demo-teacher": ("vit-demo-teacher", "demo_teacher.npz"),
    "demo-student": ("vit-demo-student", "demo_student.npz"),
}


@dataclasses.dataclass
class LoadedModel:
  """A ViT with its parameters, config and the model's own preprocessing.

  `embed_fn(params, preprocessed)` is pure and jittable (the trainer differentiates through it);
  `embed(images_uint8)` is the convenience path: preprocess + jitted embed_fn in batches.
  """
  module: ViT
  params: dict[str, Any]
  config: dict[str, Any]
  image_size: int
  dim: int
  preprocess: Callable[[np.ndarray], np.ndarray]
  embed_fn: Callable[[Any, jnp.ndarray], jnp.ndarray]

  def apply(self, params: Any, images: jnp.ndarray, train: bool = False, rngs: Any = None) -> tuple[Any, dict]:
    """`module.apply` on preprocessed images: (logits, out)."""
    return self.module.apply({"params": params}, images, train=train, rngs=rngs)

  def embed_preprocessed(self, x: np.ndarray) -> np.ndarray:
    """Preprocessed images -> (B, dim) float32 representations (jitted, compiled once per batch shape)."""
    return np.asarray(_jitted(self.embed_fn)(self.params, x))

  def embed(self, images_uint8: np.ndarray, batch_size: int = 256,
            progress: Callable[[int], Any] | None = None) -> np.ndarray:
    """uint8 NHWC images -> (B, dim) float32 representations (the config's `representation`), in padded batches
    of min(batch_size, B) rows."""
    return batching.embed_padded(self.embed_preprocessed, images_uint8, min(batch_size, max(len(images_uint8), 1)),
                                 prepare=self.preprocess, dim=self.dim, progress=progress)


@functools.lru_cache(maxsize=16)
def _jitted(fn: Callable) -> Callable:
  return jax.jit(fn)


_MODULE_FIELDS = ("num_classes", "patch_size", "width", "depth", "mlp_dim", "num_heads", "posemb", "rep_size",
                  "pool_type", "head_zeroinit")


def make_module(config: Mapping[str, Any]) -> ViT:
  """The flax module of a (complete) config."""
  return _module_and_embed_fn(_module_key(config))[0]


def _module_key(config: Mapping[str, Any]) -> tuple:
  return tuple((k, config[k]) for k in _MODULE_FIELDS) + (("representation", config["representation"]),)


@functools.lru_cache(maxsize=64)
def _module_and_embed_fn(key: tuple) -> tuple[ViT, Callable]:
  """One module and one embed_fn object per config, so `jax.jit` caches are shared by every load of a model."""
  kw = dict(key)
  p = kw.pop("patch_size")
  representation = kw.pop("representation")
  module = ViT(patch_size=(p, p), **kw)
  return module, functools.partial(_embed, module, representation)


def _embed(module: ViT, representation: str, params: Any, images: jnp.ndarray) -> jnp.ndarray:
  logits, out = module.apply({"params": params}, images, train=False)
  if representation == "pre_logits":
    return out["pre_logits"].astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  if representation == "l2_logits":
    return logits / jnp.linalg.norm(logits, axis=-1, keepdims=True).clip(1e-12)
  return logits


def representation_dim(config: Mapping[str, Any]) -> int:
  if config["representation"] == "pre_logits":
    return int(config["rep_size"] or config["width"])
  if not config["num_classes"]:
    raise ValueError(f"representation={config['representation']!r} needs a classification head: set num_classes "
                     "(or load a checkpoint that has `head/kernel`)")
  return int(config["num_classes"])


def abstract_params(config: Mapping[str, Any]) -> dict[str, Any]:
  """Parameter shapes (jax.ShapeDtypeStruct pytree) without allocating: cheap even for So400m."""
  cfg = configs.complete(dict(config))
  module = make_module(cfg)
  x = jax.ShapeDtypeStruct((1, cfg["image_size"], cfg["image_size"], 3), jnp.float32)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype)))
  return variables["params"]


def from_params(config: Mapping[str, Any], params: Any) -> LoadedModel:
  """Wraps an existing parameter pytree (e.g. after training) as a LoadedModel; shapes are not checked."""
  cfg = configs.complete(dict(config))
  module, embed_fn = _module_and_embed_fn(_module_key(cfg))
  return LoadedModel(
      module=module, params=params, config=cfg, image_size=int(cfg["image_size"]), dim=representation_dim(cfg),
      preprocess=preprocessing.make_preprocess(cfg["image_size"], cfg["preprocessing"]), embed_fn=embed_fn)


def build(config: Mapping[str, Any], seed: int | None = None) -> LoadedModel:
  """A model with freshly initialised parameters (seeded by `seed`, else config["seed"])."""
  cfg = configs.complete(dict(config))
  representation_dim(cfg)  # Fail before the (possibly slow) init.
  module = make_module(cfg)
  key = jax.random.PRNGKey(cfg["seed"] if seed is None else seed)
  x = jnp.zeros((1, cfg["image_size"], cfg["image_size"], 3), jnp.float32)
  params = jax.jit(module.init)(key, x)["params"]
  return from_params(cfg, params)


def from_checkpoint(config: Mapping[str, Any], path_or_url: str, prefix: str | None = None,
                    resample_posemb: bool = True) -> LoadedModel:
  """Loads a checkpoint into `config`, checking every name and shape.

  Formats: a big_vision flat `.npz` (per-layer or scanned layout; `prefix` selects a subtree, None detects "",
  "params/", "params/img/" from the keys) or a Hugging Face SigLIP `.safetensors` file (through the name map in
  `hf_siglip`). A learned `pos_embedding` of another square grid is resampled to the config's (big_vision's
  `resample_posemb`) unless `resample_posemb` is False. When the config leaves num_classes unset, it is taken
  from the checkpoint's `head` (absent head: no head). Nothing is dropped silently: arrays outside the image
  tower (a SigLIP text tower) are left out with an INFO line naming them; an image-tower parameter the config
  has no place for is a CheckpointMismatchError.
  """
  cfg = configs.complete(dict(config))
  source = f"Checkpoint {path_or_url}"
  if path_or_url.endswith(".safetensors"):
    flat = hf_siglip.to_big_vision(hf_siglip.read_safetensors(path_or_url), num_heads=cfg["num_heads"],
                                   source=source)
  else:
    flat = checkpoints.load_flat(path_or_url)
    prefix = checkpoints.find_image_tower(flat) if prefix is None else prefix
    flat = checkpoints.unscan(checkpoints.select_tower(flat, prefix, source))
  if cfg["num_classes"] is None and "head/kernel" in flat:
    cfg["num_classes"] = int(flat["head/kernel"].shape[-1])
  expected = abstract_params(cfg)
  if resample_posemb and "pos_embedding" in flat and "pos_embedding" in expected:
    want = tuple(expected["pos_embedding"].shape)
    if tuple(flat["pos_embedding"].shape) != want:
      logging.info("Resampling pos_embedding %s -> %s", flat["pos_embedding"].shape, want)
      flat["pos_embedding"] = checkpoints.resample_posemb(flat["pos_embedding"], want)
  params = checkpoints.match_params(expected, checkpoints.unflatten(flat), source=source)
  return from_params(cfg, jax.tree.map(jnp.asarray, params))


def load_model(spec: str, **overrides: Any) -> LoadedModel:
  """A model by spec ("demo-teacher", "demo-student" or "<config-name>:<checkpoint>"); `overrides` edit the config."""
  if spec in DEMO_MODELS:
    config_name, file_name = DEMO_MODELS[spec]
    path = os.path.join(CHECKPOINT_DIR, file_name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"Demo checkpoint {path} is missing; create it with `python -m alignet_data.demo_models`")
    return from_checkpoint(configs.get_config(config_name, **overrides), path, prefix="")
  if ":" not in spec:
    raise ValueError(
        f"Model spec {spec!r} names no checkpoint. Use one of {sorted(DEMO_MODELS)} or '<config-name>:<checkpoint>' "
        f"with config names {configs.names()}; for random weights call models.build(models.get_config(name)).")
  config_name, path = spec.split(":", 1)
  return from_checkpoint(configs.get_config(config_name, **overrides), path)
