"""On-disk caches that let sweeps skip repeated work: calibrated quantizer ranges and the loss metric's
plain probe losses, and the fingerprints that tie a run's checkpoint to its weights and data.

A cache key is a hash of everything the cached result depends on: the float weights and the calibration
images themselves (their bytes, whatever source drew them: a folder whose images were replaced, a changed
data factory or random crops drawn by other workers give other bytes), the quantizers, the units, for the
probe the reconstruction settings, and the environment (device type, torch and MQBench versions: CPU and
CUDA draw different QDrop masks). Nothing is cached unless a cache folder is given.
"""
import hashlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from mrecg.config import Config
from mrecg.files import BadFile, read_json, read_torch
from mrecg.quantization import state_mismatch
from mrecg.reporting import save_torch, write_json

log = logging.getLogger('mrecg')

# bumped when the numbers a cache holds change (5/3: content keys with device and versions)
FORMAT = {'calibration': 3, 'loss': 5}


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


def environment(device: torch.device) -> Dict[str, str]:
    """What besides the inputs changes cached numbers: the device type and the library versions."""
    import mqbench
    return {'device': torch.device(device).type, 'torch': torch.__version__,
            'mqbench': getattr(mqbench, '__version__', 'mqbench-torch2')}


def eval_fingerprint(data: Any) -> Optional[str]:
    """A digest of evaluation data that reads no image (ImageNet's 50 000 files are only stat'ed): tensors by
    their bytes, image folders (``.samples``) by every file's path, label, size and modification time, a
    ``Subset`` by its dataset and indices, a DataLoader by its dataset; any other Dataset by its type and
    length only. None when there is no data."""
    from torch.utils.data import DataLoader, Subset
    from mrecg.data import TensorData
    if data is None:
        return None
    if isinstance(data, DataLoader):
        return digest({'loader': eval_fingerprint(data.dataset), 'batch_size': data.batch_size})
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return tensor_digest([('images', data[0]), ('labels', data[1])])
    if isinstance(data, TensorData):
        labels = data.labels
        if isinstance(labels, list):  # detection targets: one dict of tensors per image
            labels = [(f'{i}.{k}', v) for i, t in enumerate(labels) for k, v in sorted(t.items())]
        else:
            labels = [('labels', labels)] if labels is not None else []
        return tensor_digest([('images', data.images)] + labels)
    if isinstance(data, Subset):
        return digest({'subset': eval_fingerprint(data.dataset), 'indices': [int(i) for i in data.indices]})
    if isinstance(getattr(data, 'samples', None), list):
        return digest([(str(path), label, *_stat(path)) for path, label in data.samples])
    return digest({'type': f'{type(data).__module__}.{type(data).__qualname__}', 'len': len(data)})


def _stat(path: str):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None


def cache_key(cfg: Config, kind: str, weights: str, images: str, label: str, world: int = 1,
              env: Optional[Dict[str, str]] = None) -> str:
    """Hash of everything a cached ``kind`` ('calibration' or 'loss') result depends on."""
    q = cfg.quantize
    act = asdict(q.a_qconfig)
    ste_bounds = act.pop('ste_bounds')  # reconstruction only: calibration does not depend on it
    key: Dict[str, Any] = {
        'kind': kind, 'format': FORMAT[kind], 'model': label, 'kwargs': cfg.model.kwargs, 'weights': weights,
        'images': images, 'seed': cfg.process.seed, 'calib_batch': cfg.data.batch_size,
        'quant': {'w': asdict(q.w_qconfig), 'a': act, 'fold_bn': q.fold_bn,
                  'layer_bits': [asdict(r) for r in q.layer_bits]}, 'env': env or {}}
    if kind == 'loss':
        recon = asdict(q.reconstruction)
        recon.pop('prefetch')  # where batches are gathered does not change the losses
        if 'device' in (env or {}):  # 'auto' means another kernel set (other masks) on another device
            from mrecg.kernels import resolve
            recon['kernels'] = resolve(recon['kernels'], torch.device(env['device']))
        key.update(units=cfg.model.units, recon=recon,
                   probe_iterations=cfg.mrecg.probe_iterations)
        if ste_bounds != 'strict':
            key['ste_bounds'] = ste_bounds
        if world > 1:  # a data-parallel probe draws other batches: its losses are not the single run's
            key['world_size'] = world
    return digest(key)[:24]


class RunCache:
    """The cache folder of one run (``process.cache_dir``), keyed by the digests of the run's float weights
    (``model_digest``) and calibration images (``images_id``) and by its ``environment``."""

    def __init__(self, folder: str, cfg: Config, weights: str, images: str, label: str, world: int = 1,
                 env: Optional[Dict[str, str]] = None):
        self.folder, self.cfg, self.world, self.env = folder, cfg, world, env or {}
        self.weights, self.images, self.label = weights, images, label

    def path(self, kind: str) -> str:
        key = cache_key(self.cfg, kind, self.weights, self.images, self.label, self.world, self.env)
        return os.path.join(self.folder, f'{kind}_{key}.' + ('pt' if kind == 'calibration' else 'json'))

    def calibration(self, expected: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """The cached calibrated state, if it fits ``expected`` (the prepared model's state: the same keys and
        dtypes, finite values, each shape the model's or, for a quantizer's placeholder, one axis)."""
        path = self.path('calibration')
        if not self.cfg.process.cache_calibration or not os.path.isfile(path):
            return None
        state = self._read(path, read_torch)
        if state is None:
            return None
        problem = state_mismatch(state, expected)
        return self._miss(path, problem) if problem else state

    @staticmethod
    def _read(path: str, read) -> Any:
        try:
            return read(path, 'cache entry')
        except BadFile as exc:
            log.warning('%s: treated as a miss, recomputed and replaced', exc)
            return None

    @staticmethod
    def _miss(path: str, why: str) -> None:
        log.warning('cache entry %s is %s: treated as a miss, recomputed and replaced', path, why)
        return None

    def save_calibration(self, state: Dict[str, torch.Tensor]) -> None:
        if self.cfg.process.cache_calibration:
            save_torch(self.path('calibration'), state)

    def unit_losses(self, names: List[str]) -> Optional[List[float]]:
        path = self.path('loss')
        if not os.path.isfile(path):
            return None
        entry = self._read(path, read_json)
        if entry is None:
            return None
        losses = entry.get('losses') if isinstance(entry, dict) else None
        if not (isinstance(losses, list) and len(losses) == len(names)
                and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses)):
            return self._miss(path, 'not a list of one loss per unit')
        return losses if entry.get('units') == names else None

    def save_unit_losses(self, names: List[str], losses: List[float], iterations: int) -> None:
        write_json(self.path('loss'), {'units': names, 'losses': losses, 'iterations': iterations})
