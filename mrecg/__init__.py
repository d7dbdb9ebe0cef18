"""MRECG post-training quantization: BRECQ / QDrop block reconstruction with mixed reconstruction
granularity, on MQBench.

    import mrecg
    result = mrecg.quantize(model, calib_images, mrecg.Config(...), eval_data=(test_x, test_y))
    print(mrecg.plan(model, config))     # units, ModCap, groups: what --plan prints
"""
import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the static names, for type checkers and the API docs; at run time each loads on first use
    from mrecg.api import QuantizationResult, RunState, Timings, quantize, resolve_device  # noqa: F401
    from mrecg.config import (ActQuantConfig, Config, DataConfig, LayerBits, ModelConfig,  # noqa: F401
                              MrecgConfig, ProcessConfig, QuantizeConfig, ReconstructionConfig,
                              WeightQuantConfig, as_config, load_config)
    from mrecg.errors import ConfigError, UserError  # noqa: F401
    from mrecg.evaluation import Accuracy  # noqa: F401
    from mrecg.group_policy import GroupingInfo  # noqa: F401
    from mrecg.planning import Plan  # noqa: F401
    from mrecg.preparation import Prepared, prepare  # noqa: F401
    from mrecg.zoo import create_model, list_models  # noqa: F401

# public names -> the module that defines them; imported on first use, so ``ptq_main.py`` can refuse a bad
# config in a fraction of a second, before torch is loaded
_EXPORTS = {
    'mrecg.api': ('QuantizationResult', 'RunState', 'Timings', 'quantize', 'resolve_device'),
    'mrecg.config': ('ActQuantConfig', 'Config', 'DataConfig', 'LayerBits', 'ModelConfig', 'MrecgConfig',
                     'ProcessConfig', 'QuantizeConfig', 'ReconstructionConfig', 'WeightQuantConfig', 'as_config',
                     'load_config'),
    'mrecg.errors': ('ConfigError', 'UserError'),
    'mrecg.evaluation': ('Accuracy',),
    'mrecg.planning': ('Plan',),
    'mrecg.group_policy': ('GroupingInfo',),
    'mrecg.preparation': ('Prepared', 'prepare'),
    'mrecg.zoo': ('create_model', 'list_models'),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [*_WHERE, 'export_onnx', 'plan']


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f'{__name__}.{name}') is not None:  # a submodule: mrecg.zoo, mrecg.data, ...
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


def export_onnx(model, path, sample, eval_batches=None, device='cpu'):
    """``result.model`` as ONNX with low-bit weights, checked in onnxruntime against the fake-quant model (run on
    ``device``) on ``eval_batches`` (see ``mrecg.export``)."""
    from mrecg.export import export_onnx as export
    return export(model, path, sample, eval_batches, device)


def plan(model, config=None, cached_losses=None, calib_images=None):
    """What a run of ``config`` would do on ``model`` (units, ModCap, groups, bits), without data; a bit search
    with a data measure needs ``calib_images`` (an N x C x H x W tensor)."""
    from mrecg.planning import plan as make_plan
    from mrecg.config import as_config
    return make_plan(model, as_config(config), cached_losses, calib_images)


__version__ = '0.3.0'
