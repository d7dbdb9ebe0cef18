"""MRECG post-training quantization: BRECQ / QDrop block reconstruction with mixed reconstruction
granularity, on MQBench.

    import mrecg
    result = mrecg.quantize(model, calib_images, mrecg.Config(...), eval_data=(test_x, test_y))
    print(mrecg.plan(model, config))     # units, ModCap, groups: what --plan prints
"""
from mrecg.api import QuantizationResult, RunState, Timings, quantize, resolve_device  # noqa: F401
from mrecg.config import (ActQuantConfig, Config, DataConfig, LayerBits, ModelConfig, MrecgConfig,  # noqa: F401
                          ProcessConfig, QuantizeConfig, ReconstructionConfig, WeightQuantConfig, as_config,
                          load_config)
from mrecg.errors import ConfigError, UserError  # noqa: F401
from mrecg.evaluation import Accuracy  # noqa: F401
from mrecg.planning import GroupingInfo, Plan, Prepared, prepare  # noqa: F401
from mrecg.zoo import create_model, list_models  # noqa: F401


def export_onnx(model, path, sample, eval_batches=None):
    """``result.model`` as ONNX with low-bit weights, checked in onnxruntime (see ``mrecg.export``)."""
    from mrecg.export import export_onnx as export
    return export(model, path, sample, eval_batches)


def plan(model, config=None, cached_losses=None, calib_images=None):
    """What a run of ``config`` would do on ``model`` (units, ModCap, groups, bits), without data; a bit search
    with a data measure needs ``calib_images`` (an N x C x H x W tensor)."""
    from mrecg.planning import plan as make_plan
    return make_plan(model, as_config(config), cached_losses, calib_images)


__version__ = '0.3.0'
