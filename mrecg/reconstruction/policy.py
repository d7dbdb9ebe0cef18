"""One device policy for the reconstruction step, instead of ``device.type`` checks spread over the engine.

From the settings and the device it decides, once: the kernel set (``mrecg.kernels``), where the caches live,
whether the next step's batch is gathered ahead (host caches feeding a GPU), and, while the engine runs, cuDNN's
autotuner (on for CUDA: the step's shapes are static per group; off with ``deterministic``). ``cache_device:
auto`` on a GPU is settled when the engine starts, from the caches' size and the free memory (``memory``).
"""
import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from mrecg.config import ReconstructionConfig
from mrecg.kernels import KernelSet, kernel_set
from mrecg.reconstruction.memory import cache_plan


def prefetch_for(setting: str, device: torch.device, cache_device: torch.device) -> bool:
    """Gather the next batch ahead: asked for, or (auto) host caches feeding a GPU."""
    return setting == 'on' or (setting == 'auto' and device.type == 'cuda' and cache_device.type == 'cpu')


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    kernels: KernelSet
    cache_device: torch.device
    prefetch: bool
    cudnn_benchmark: bool
    deterministic: bool = False
    cache_reason: str = ''  # why the caches are where they are, when auto moved them off the GPU

    @classmethod
    def resolve(cls, settings: ReconstructionConfig, device: torch.device, deterministic: bool = False):
        cache_device = cache_plan(settings.cache_device, device).device  # auto: settled at the start (engine)
        return cls(device, kernel_set(settings.kernels, device), cache_device,
                   prefetch_for(settings.prefetch, device, cache_device),
                   device.type == 'cuda' and not deterministic, deterministic)

    def with_caches_on(self, cache_device: torch.device, reason: str, prefetch_setting: str = 'auto'):
        """The policy once ``cache_device: auto`` has measured where the caches fit (``memory.cache_plan``)."""
        return dataclasses.replace(self, cache_device=cache_device, cache_reason=reason,
                                   prefetch=prefetch_for(prefetch_setting, self.device, cache_device))

    def describe(self) -> dict:
        """What results.json records of the engine's device choices."""
        out = {'kernels': self.kernels.name, 'cache_device': str(self.cache_device), 'prefetch': self.prefetch}
        if self.cache_reason:
            out['cache_reason'] = self.cache_reason
        if self.device.type == 'cuda':
            out.update(cudnn_benchmark=self.cudnn_benchmark, deterministic=self.deterministic, tf32_conv=torch.backends.cudnn.allow_tf32,
                       tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        return out

    @contextlib.contextmanager
    def applied(self):
        """cuDNN's autotuner and determinism as decided, restored afterwards (the caller's settings are the
        caller's)."""
        was = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark or (was[0] and self.device.type != 'cuda')
        torch.backends.cudnn.deterministic = self.deterministic or was[1]
        try:
            yield self
        finally:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = was
