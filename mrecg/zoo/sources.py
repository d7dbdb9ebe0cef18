"""``model.type`` -> a float network: a registry name, ``torchvision:<name>`` (no weights),
``timm:<name>`` (``pretrained=False``), or an import path ``package.module:Name`` / ``file.py:Name``
(a class or a function). Nothing is downloaded; ``model.path`` supplies the weights."""
import inspect
from typing import Any, Dict

import torch.nn as nn

from mrecg.errors import UserError
from mrecg.imports import first_line, import_object, is_import_path
from mrecg.zoo.registry import build_model, list_models, model_entry, model_kwargs_error


def describe_sources() -> str:
    return (f'a registry name ({", ".join(list_models())}), torchvision:<name>, timm:<name>, '
            'package.module:Name or path/to/file.py:Name')


def check_kwargs(builder, kwargs: Dict[str, Any], spec: str) -> None:
    """Name the first argument the builder does not take (before calling it)."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for k in kwargs:
        if k not in params:
            raise UserError(f'model.kwargs: {spec} takes no argument {k!r} (it takes: {", ".join(params)})')


def create_model(spec: str, kwargs: Dict[str, Any] = None) -> nn.Module:
    """The float model ``spec`` names, built with ``kwargs``, in eval mode."""
    kwargs = dict(kwargs or {})
    if not spec:
        raise UserError(f'model.type is not set: give {describe_sources()}')
    if spec.startswith('torchvision:'):
        builder = _torchvision_builder(spec[len('torchvision:'):])
        model = _call(builder, kwargs, spec, **_no_download(builder, kwargs, spec))
    elif spec.startswith('timm:'):
        model = _timm(spec[len('timm:'):], kwargs)
    elif is_import_path(spec):
        obj = import_object(spec, 'model.type')
        if not callable(obj):
            raise UserError(f'model.type {spec} is not a class or function')
        check_kwargs(obj, kwargs, spec)
        model = _call(obj, kwargs, spec)
    else:
        try:
            model_entry(spec)
        except ValueError:
            raise UserError(f'model.type: unknown model type {spec!r}; give {describe_sources()}') from None
        problem = model_kwargs_error(spec, kwargs)
        if problem:
            raise UserError(f'model.kwargs: {problem}')
        model = build_model(spec, **kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f'model.type {spec} returned {type(model).__name__}, not a torch.nn.Module')
    return model.eval()


def _call(builder, kwargs, spec, **fixed):
    try:
        return builder(**fixed, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f'model.type {spec}: building it raised {type(exc).__name__}: {first_line(exc)}') from None


def _no_download(builder, kwargs: Dict[str, Any], spec: str) -> Dict[str, Any]:
    """torchvision builders fetch pretrained weights when asked; a segmentation or detection builder also fetches
    its backbone's by default (``weights_backbone``). Neither happens here: the weights come from model.path."""
    for name in ('weights', 'weights_backbone'):
        if kwargs.get(name) is not None:
            raise UserError(f'model.kwargs.{name}: {spec} is built without downloading anything; load the weights '
                            'with model.path (a checkpoint file) instead')
        kwargs.pop(name, None)
    takes = inspect.signature(builder).parameters
    return {'weights': None, **({'weights_backbone': None} if 'weights_backbone' in takes else {})}


def _torchvision_builder(name: str):
    import torchvision.models as tvm
    try:
        return tvm.get_model_builder(name)
    except ValueError:
        raise UserError(f'model.type: torchvision has no model {name!r} (see torchvision.models.list_models())') \
            from None


def _timm(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError('model.type timm:... needs timm: pip install timm') from None
    if not timm.is_model(name):
        raise UserError(f'model.type: timm has no model {name!r} (see timm.list_models())')
    return _call(timm.create_model, kwargs, f'timm:{name}', model_name=name, pretrained=False)


def registry_family(spec: str) -> str:
    """The checkpoint-renaming family of a registry model ('' for any other source)."""
    try:
        return model_entry(spec).family
    except ValueError:
        return ''

