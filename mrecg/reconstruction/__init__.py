"""Unit-by-unit reconstruction (AdaRound rounding + activation steps, BRECQ / QDrop), over any grouping.

- ``streams``: the cached float and quantized streams and the passes that fill them;
- ``rounding``: AdaRound (init, the kernel set's stand-in layer, harden) and the group's trainable graph;
- ``step``: one group's optimisation state, its step, optimiser and loss windows;
- ``policy``: the device policy (kernel set, cache placement, prefetch, cuDNN);
- ``memory``: the caches' peak estimated before any is cached, and where ``cache_device: auto`` puts them;
- ``engine``: the run loop (``Reconstructor``, built from a config with ``Reconstructor.from_config``).
"""
from mrecg.kernels import lp_loss
from mrecg.reconstruction.engine import GroupResult, Reconstructor, group_seed
from mrecg.reconstruction.policy import DevicePolicy
from mrecg.reconstruction.step import round_beta
from mrecg.reconstruction.streams import DTYPES

__all__ = ['DTYPES', 'DevicePolicy', 'GroupResult', 'Reconstructor', 'group_seed', 'lp_loss', 'round_beta']
