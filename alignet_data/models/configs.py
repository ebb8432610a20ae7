"""Named ViT configs, as plain data (JSON-serialisable dicts).

Every config holds every field of `FIELDS`; `get_config(name, **overrides)` returns a fresh copy. Big models use
big_vision's variant table (Table 2 of arXiv:2106.04560); the demo models are tiny ViTs of the same code at 32 px.
`num_classes` None means "no classification head" or, when loading a checkpoint, "take it from the checkpoint".
"""
from __future__ import annotations

import copy
from typing import Any

# Field -> default. `representation` names what `embed_fn` returns: "pre_logits" (the pooled representation,
# the input to `head`), "logits" (the head's output, e.g. SigLIP's image embedding before normalisation) or
# "l2_logits" (that, L2-normalised: SigLIP's zimg). `preprocessing` is a convention in `preprocessing.py`.
# `triplet_head` / `triplet_head_init`: the linear triplet head the trainer puts on the representation when
# fine-tuning this model as a student (None: the trainer's `head_dim` rule decides). Only "lecun_normal" (kernel;
# zero bias) is implemented: flax's Dense default, which the released trainer's `TripletWrapper` head uses.
FIELDS: dict[str, Any] = {
    "name": "",
    "patch_size": 16,
    "image_size": 224,
    "width": 768,
    "depth": 12,
    "mlp_dim": 3072,
    "num_heads": 12,
    "pool_type": "gap",
    "posemb": "learn",
    "rep_size": 0,
    "head_zeroinit": True,
    "num_classes": None,
    "representation": "pre_logits",
    "preprocessing": "siglip",
    "seed": 0,
    "triplet_head": None,
    "triplet_head_init": "lecun_normal",
}
TRIPLET_HEAD_INITS = ("lecun_normal",)

# big_vision decode_variant(): width, depth, mlp_dim, num_heads.
_VARIANTS = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "so400m": (1152, 27, 4304, 16),
}


def _variant(name: str, variant: str, patch: int, **kw: Any) -> dict[str, Any]:
  width, depth, mlp_dim, num_heads = _VARIANTS[variant]
  return {**FIELDS, "name": name, "patch_size": patch, "width": width, "depth": depth, "mlp_dim": mlp_dim,
          "num_heads": num_heads, **kw}


CONFIGS: dict[str, dict[str, Any]] = {
    # Demo teacher: the better model (wider, deeper, MAP pooling like SigLIP, SigLIP's [-1, 1] convention).
    "vit-demo-teacher": {
        **FIELDS, "name": "vit-demo-teacher", "patch_size": 8, "image_size": 32, "width": 96, "depth": 4,
        "mlp_dim": 192, "num_heads": 4, "pool_type": "map", "preprocessing": "siglip", "seed": 0,
    },
    # Demo student: smaller, mean pooling, the released student trainer's [0, 1] cubic-resize convention.
    "vit-demo-student": {
        **FIELDS, "name": "vit-demo-student", "patch_size": 8, "image_size": 32, "width": 64, "depth": 3,
        "mlp_dim": 128, "num_heads": 4, "pool_type": "gap", "preprocessing": "student", "seed": 1,
    },
    "ti/4": _variant("ti/4", "ti", 4, image_size=32, preprocessing="student"),
    "ti/16": _variant("ti/16", "ti", 16, preprocessing="student"),
    "s/16": _variant("s/16", "s", 16, preprocessing="student"),
    "b/16": _variant("b/16", "b", 16, preprocessing="student"),
    "l/16": _variant("l/16", "l", 16, preprocessing="student"),
    # SigLIP So400m/14 image tower: MAP pooling. Released SigLIP image towers have no `head` (big_vision
    # out_dim=(None, ...); Hugging Face's SiglipVisionModel neither): the MAP output (pre_logits) is the image
    # embedding and the teacher representation. A checkpoint that has `head/kernel` gets its head loaded.
    "so400m/14": _variant("so400m/14", "so400m", 14, image_size=224, pool_type="map", head_zeroinit=False,
                          preprocessing="siglip"),
    "so400m/14-384": _variant("so400m/14-384", "so400m", 14, image_size=384, pool_type="map",
                              head_zeroinit=False, preprocessing="siglip"),
    # The official AligNet student (google-deepmind/alignet configs/siglip.py): big_vision's B/16 with MAP pooling,
    # loaded from "SigLIP B/16 224" (webli_en_b16_224, its `params/img/` tower; no `head`), fed the trainer's
    # [0, 1] OpenCV-cubic images, with a Dense(1024) triplet head on the MAP output (pre_logits).
    "siglip-b/16": _variant("siglip-b/16", "b", 16, image_size=224, pool_type="map", head_zeroinit=False,
                            preprocessing="student", triplet_head=1024, triplet_head_init="lecun_normal"),
}


def names() -> list[str]:
  return sorted(CONFIGS)


def get_config(name: str, **overrides: Any) -> dict[str, Any]:
  """A fresh copy of the named config with `overrides` applied (unknown fields are an error)."""
  if name not in CONFIGS:
    raise KeyError(f"Unknown model config {name!r}. Available configs: {', '.join(names())}")
  return complete({**copy.deepcopy(CONFIGS[name]), **overrides})


def complete(config: dict[str, Any]) -> dict[str, Any]:
  """Fills defaults and validates a config dict; returns a new dict."""
  unknown = sorted(set(config) - set(FIELDS))
  if unknown:
    raise ValueError(f"Unknown model config field(s) {unknown}; known fields: {sorted(FIELDS)}")
  cfg = {**FIELDS, **config}
  if cfg["rep_size"] is True:  # big_vision's "rep_size=True" means a width-sized pre-logits layer.
    cfg["rep_size"] = cfg["width"]
  cfg["rep_size"] = int(cfg["rep_size"] or 0)
  if cfg["image_size"] < cfg["patch_size"]:  # A remainder is dropped (SigLIP /14 at 384 px: 27x27 patches).
    raise ValueError(f"image_size={cfg['image_size']} is smaller than patch_size={cfg['patch_size']}")
  if cfg["width"] % cfg["num_heads"]:
    raise ValueError(f"width={cfg['width']} is not divisible by num_heads={cfg['num_heads']}")
  if cfg["pool_type"] not in ("gap", "tok", "map", "0"):
    raise ValueError(f"Unknown pool_type {cfg['pool_type']!r}; expected 'gap', 'tok', 'map' or '0'")
  if cfg["triplet_head"] is not None and (isinstance(cfg["triplet_head"], bool) or int(cfg["triplet_head"]) < 0):
    raise ValueError(f"triplet_head must be None or a size >= 0, got {cfg['triplet_head']!r}")
  if cfg["triplet_head_init"] not in TRIPLET_HEAD_INITS:
    raise ValueError(f"Unknown triplet_head_init {cfg['triplet_head_init']!r}; the trainer implements "
                     f"{TRIPLET_HEAD_INITS}")
  if cfg["representation"] not in ("pre_logits", "logits", "l2_logits"):
    raise ValueError(f"Unknown representation {cfg['representation']!r}; expected 'pre_logits', 'logits' or "
                     "'l2_logits'")
  return cfg
