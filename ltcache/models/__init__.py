"""Backbones by name; each exposes ``features(x)`` (penultimate) and ``fc`` separately."""
from ltcache.models import resnet_cifar as _resnet_cifar  # noqa: F401  (registers)
from ltcache.models import resnet_imagenet as _resnet_imagenet  # noqa: F401  (registers)
from ltcache.models.registry import build_model, list_models, load_foreign_state_dict, register_model

__all__ = ["build_model", "list_models", "load_foreign_state_dict", "register_model"]
