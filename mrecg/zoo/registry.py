"""Model registry: build any supported network by name, with its constructor arguments checked first."""
import inspect
from dataclasses import dataclass
from typing import Callable, Dict

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    family: str
    image_size: int  # the input size the architecture was designed for (used by --plan without data)


_MODELS: Dict[str, ModelEntry] = {}


def register_model(name: str, family: str, image_size: int):
    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f'model {name!r} registered twice')
        _MODELS[name] = ModelEntry(name, fn, family, image_size)
        return fn
    return wrap


def list_models():
    return sorted(_MODELS)


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f'unknown model type {name!r}; known: {", ".join(list_models())}')
    return _MODELS[name]


def model_kwargs_error(name: str, kwargs: dict):
    """Return a message naming the first constructor argument the model does not take, else None."""
    params = inspect.signature(model_entry(name).builder).parameters
    for key in kwargs:
        if key not in params:
            return f'model {name!r} takes no argument {key!r} (it takes: {", ".join(params)})'
    return None


def build_model(name: str, **kwargs) -> nn.Module:
    error = model_kwargs_error(name, kwargs)
    if error:
        raise ValueError(error)
    return model_entry(name).builder(**kwargs)


def init_conv_bn(model: nn.Module) -> None:
    """The ResNet paper's initialisation (torchvision's too): He-normal convs (fan-out, ReLU), BN at identity;
    shared by the ResNet and RegNet builders."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
