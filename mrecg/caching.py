"""On-disk caches that let sweeps skip repeated work: calibrated quantizer ranges and the loss metric's
plain probe losses. A key is a hash of everything the cached result depends on: the float weights and
calibration images themselves (not file names), the quantizers, the units and, for the probe, the
reconstruction settings. Nothing is cached unless a cache folder is given.
"""
import hashlib
import json
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from mrecg.config import Config
from mrecg.reporting import save_torch, write_json

# bumped when the numbers a cache holds change (loss 4: weights/images digests, typed config)
FORMAT = {'calibration': 2, 'loss': 4}


def tensor_digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    return tensor_digest(sorted(model.state_dict().items()))


def digest(obj: Any) -> str:
    """A stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def images_id(images: torch.Tensor) -> str:
    """The identity of calibration images handed over as a tensor: their digest."""
    return tensor_digest([('images', images)])


def data_config_id(cfg: Config) -> str:
    """The identity of the calibration images a config draws (without drawing them: --plan has no data)."""
    d = cfg.data
    key = {'type': d.type, 'path': d.path, 'kwargs': d.kwargs, 'input_size': d.input_size, 'mean': d.mean,
           'std': d.std, 'test_resize': d.test_resize, 'cali_transform': d.cali_transform,
           'split_seed': d.split_seed, 'cali_size': cfg.quantize.cali_size}
    return digest(key)


def cache_key(cfg: Config, kind: str, weights: str, images: str, label: str, world: int = 1) -> str:
    """Hash of everything a cached ``kind`` ('calibration' or 'loss') result depends on."""
    q = cfg.quantize
    act = asdict(q.a_qconfig)
    ste_bounds = act.pop('ste_bounds')  # reconstruction only: calibration does not depend on it
    key: Dict[str, Any] = {
        'kind': kind, 'format': FORMAT[kind], 'model': label, 'kwargs': cfg.model.kwargs, 'weights': weights,
        'images': images, 'seed': cfg.process.seed, 'calib_batch': cfg.data.batch_size,
        'quant': {'w': asdict(q.w_qconfig), 'a': act, 'fold_bn': q.fold_bn,
                  'layer_bits': [asdict(r) for r in q.layer_bits]}}
    if kind == 'loss':
        recon = asdict(q.reconstruction)
        recon.pop('prefetch')  # where batches are gathered does not change the losses
        key.update(units=cfg.model.units, recon=recon,
                   probe_iterations=cfg.mrecg.probe_iterations)
        if ste_bounds != 'strict':
            key['ste_bounds'] = ste_bounds
        if world > 1:  # a data-parallel probe draws other batches: its losses are not the single run's
            key['world_size'] = world
    return digest(key)[:24]


class RunCache:
    """The cache folder of one run (``process.cache_dir``), keyed by the run's weights and images."""

    def __init__(self, folder: str, cfg: Config, model: nn.Module, data_id: str, label: str, world: int = 1):
        self.folder, self.cfg, self.world = folder, cfg, world
        self.weights, self.images, self.label = model_digest(model), data_id, label

    def path(self, kind: str) -> str:
        key = cache_key(self.cfg, kind, self.weights, self.images, self.label, self.world)
        return os.path.join(self.folder, f'{kind}_{key}.' + ('pt' if kind == 'calibration' else 'json'))

    def calibration(self) -> Optional[Dict[str, torch.Tensor]]:
        path = self.path('calibration')
        if not self.cfg.process.cache_calibration or not os.path.isfile(path):
            return None
        return torch.load(path, map_location='cpu', weights_only=True)

    def save_calibration(self, state: Dict[str, torch.Tensor]) -> None:
        if self.cfg.process.cache_calibration:
            save_torch(self.path('calibration'), state)

    def unit_losses(self, names: List[str]) -> Optional[List[float]]:
        path = self.path('loss')
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            entry = json.load(f)
        return entry['losses'] if entry.get('units') == names else None

    def save_unit_losses(self, names: List[str], losses: List[float], iterations: int) -> None:
        write_json(self.path('loss'), {'units': names, 'losses': losses, 'iterations': iterations})
