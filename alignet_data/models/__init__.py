"""ViT models in big_vision's parameter layout: configs as data, flat-npz checkpoints, per-model preprocessing.

    from alignet_data import models
    m = models.load_model("demo-teacher")             # or "<config-name>:<checkpoint path/URL>"
    vectors = m.embed(images_uint8)                   # == m.embed_fn(m.params, m.preprocess(images_uint8))
"""
from alignet_data.models.checkpoints import CheckpointMismatchError, load_checkpoint, save_checkpoint
from alignet_data.models.configs import CONFIGS, get_config
from alignet_data.models.registry import (
    DEMO_MODELS,
    LoadedModel,
    abstract_params,
    build,
    from_checkpoint,
    from_params,
    load_model,
)
from alignet_data.models.vit import ViT

__all__ = [
    "CONFIGS", "DEMO_MODELS", "CheckpointMismatchError", "LoadedModel", "ViT", "abstract_params", "build",
    "from_checkpoint", "from_params", "get_config", "load_checkpoint", "load_model", "save_checkpoint",
]
