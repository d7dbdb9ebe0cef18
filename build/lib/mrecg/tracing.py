"""Whether torch.fx (and so MQBench) can trace a model, and if not, which module stopped it.

MQBench rewrites a model through a symbolic trace: Python control flow on tensor values, tensor shapes
used as Python numbers, or calls torch.fx cannot follow end the trace deep inside some ``forward``. The
error torch gives names neither the module nor what to do, so we find the innermost ``forward`` of the
user's model on the traceback and say that, in one line, before any heavy work.
"""
import sys
import traceback
from typing import Optional

import torch.fx as fx
import torch.nn as nn

from mrecg.errors import UserError
from mrecg.imports import first_line

ADVICE = ('make its forward traceable by torch.fx (no Python if/for on tensor values, no tensor shapes as '
          'Python numbers; wrap such a helper with torch.fx.wrap), or quantize a traceable part of the model')


def failing_module(model: nn.Module, tb) -> Optional[str]:
    """The qualified name of the innermost module of ``model`` whose code is on the traceback ``tb``."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(tb):
        owner = frame.f_locals.get('self')
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = (names[id(owner)] or '(the model itself)', type(owner).__name__, frame.f_code.co_filename,
                     frame.f_lineno)
    if found is None:
        return None
    name, cls, filename, line = found
    return f"module '{name}' ({cls}, {filename}:{line})"


def trace_error(model: nn.Module, exc: BaseException, tb) -> UserError:
    where = failing_module(model, tb)
    where = f' in {where}' if where else ''
    return UserError(f'torch.fx cannot trace the model{where}: {type(exc).__name__}: {first_line(exc)}; {ADVICE}')


def prepare_error(exc: BaseException) -> UserError:
    """MQBench traced the model but could not insert its quantizers (a layer type it does not support)."""
    return UserError(f'MQBench cannot quantize the model (it traced, but inserting quantizers failed): '
                     f'{type(exc).__name__}: {first_line(exc)}; MQBench\'s academic backend quantizes Conv2d and '
                     'Linear: replace the layer it names, or quantize a part of the model without it')


def check_traceable(model: nn.Module) -> fx.GraphModule:
    """A symbolic trace of ``model``, or a ``UserError`` naming the module that cannot be traced."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError, ... from user code
        raise trace_error(model, exc, sys.exc_info()[2]) from None
