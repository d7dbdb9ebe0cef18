"""Load the checkpoints users bring, strictly by parameter name.

Accepted layouts: ``{'model': sd}`` (BRECQ), ``{'state_dict': sd}`` with or without ``module.`` prefixes
(``model_best.pth.tar``), a bare state dict, torchvision's ResNets (same names as ours) and the
torchvision / d-li14 naming of MobileNetV2, which is renamed key by key (never matched by position,
unlike the authors' loader).
Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""
import os
import re
from typing import Dict, List

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or does not fit the model."""


def _unwrap(obj) -> Dict[str, torch.Tensor]:
    for key in ('model', 'state_dict', 'model_state_dict', 'module'):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return _unwrap(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError('checkpoint holds no state dict (looked under model, state_dict and the top level)')
    return obj


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in ('module.', 'model.'):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _torchvision_mobilenet_v2(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """torchvision nests conv+bn (features.N.conv.{0.0,0.1,1.0,1.1,2,3}); d-li14 names the last 1x1 conv
    ``conv.{0,1}`` and the classifier bare. Detected on the whole checkpoint, then renamed key by key."""
    torchvision = any(re.match(r'features\.\d+\.conv\.\d+\.\d+\.', k) for k in sd)
    last = len(model.features) - 1
    out = {}
    for key, value in sd.items():
        m = re.match(r'features\.(\d+)\.conv\.(\d+)(?:\.(\d+))?\.([a-z_]+)$', key)
        if torchvision and m:
            block, seq, sub, param = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            expand = len(model.features[block].conv) == 8
            table = ({(0, '0'): 0, (0, '1'): 1, (1, '0'): 3, (1, '1'): 4, (2, None): 6, (3, None): 7} if expand
                     else {(0, '0'): 0, (0, '1'): 1, (1, None): 3, (2, None): 4})
            if (seq, sub) in table:
                key = f'features.{block}.conv.{table[(seq, sub)]}.{param}'
        elif re.match(r'conv\.[01]\.', key):
            key = f'features.{last}.' + key[len('conv.'):]
        elif re.match(r'classifier\.(weight|bias)$', key):
            key = key.replace('classifier.', 'classifier.1.')
        out[key] = value
    return out


_RENAMERS = {'mobilenet_v2': _torchvision_mobilenet_v2}


def _rename(sd: Dict[str, torch.Tensor], model: nn.Module, family: str) -> Dict[str, torch.Tensor]:
    expected = set(model.state_dict())
    if set(sd) <= expected or family not in _RENAMERS:
        return sd
    renamed = _RENAMERS[family](sd, model)
    return renamed if len(set(renamed) & expected) > len(set(sd) & expected) else sd


def _summary(keys: List[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def load_checkpoint(model: nn.Module, path: str, family: str = '') -> None:
    """Load ``path`` into ``model`` by name; raise CheckpointError listing missing/unexpected/mis-shaped keys."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint file not found: {path}')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # pickle with code, truncated file, not a torch file
        text = str(exc).strip()
        raise CheckpointError(f'cannot read checkpoint {path}: {text.splitlines()[0] if text else type(exc).__name__} '
                              '(only tensors load: weights_only=True; a file that needs code to load is refused)') \
            from None
    sd = _rename(_strip_prefixes(_unwrap(obj)), model, family)
    sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shape = [f'{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f'missing {len(missing)} keys: {_summary(missing)}')
        if unexpected:
            parts.append(f'unexpected {len(unexpected)} keys: {_summary(unexpected)}')
        if shape:
            parts.append(f'shape mismatch: {_summary(shape, 3)}')
        raise CheckpointError(f'checkpoint {path} does not fit the model: ' + '; '.join(parts))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f'checkpoint {path} holds NaN or infinite values in {len(bad)} tensors: {_summary(bad)} '
                              '(a diverged or corrupted training run?)')
    model.load_state_dict(sd, strict=False)
