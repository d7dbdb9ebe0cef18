"""The ``cuda`` kernels: the ``cpu`` kernels' autograd functions with what a GPU wants instead of what a 2-core CPU
wants: QDrop's mask drawn on the device as ``rand < prob`` (the CPU's byte-table ``index_select`` was 48 % of
the step's CUDA time on an H200), convolutions always cuDNN's (no dense depthwise matrices) and the regulariser's
power as ``pow`` (no exp2 approximation). Eager: no compiler needed, any device torch has.
"""
import torch


def device_keep(like: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """0./1. mask in ``like``'s dtype, 1 with probability ``prob``, drawn on ``like``'s device."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return (torch.rand(like.shape, generator=generator, device=like.device) < prob).to(dtype)
