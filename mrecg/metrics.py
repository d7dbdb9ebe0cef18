"""The task's metric (``eval.metric``): top-1 for classifiers, mean IoU for segmentation, COCO mAP for detectors
(``mrecg.detection``), or a user function.

Every metric returns an ``Accuracy`` whose ``metric`` names the headline figure, so results files, tables and
``mrecg collect`` carry the metric's name. Outputs are read the way torchvision's task models give them: a
tensor, or a dict whose ``out`` entry is the prediction (segmentation).
"""
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mrecg.config import EvalConfig
from mrecg.distributed import Dist
from mrecg.errors import UserError
from mrecg.evaluation import Accuracy, evaluate
from mrecg.imports import import_object

Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]


def prediction(out: Any) -> torch.Tensor:
    """The prediction in a network's output: the tensor itself, ``out['out']`` (torchvision segmentation), or
    the only tensor of a one-entry dict/tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and 'out' in out:
        return out['out']
    values = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else []
    if len(values) == 1 and isinstance(values[0], torch.Tensor):
        return values[0]
    raise UserError(f'the network returns a {type(out).__name__}; eval.metric miou needs the class scores '
                    "(a tensor N x C x H x W, or a dict with 'out')")


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int, ignore_index: int) -> torch.Tensor:
    """classes x classes counts (rows: true class, columns: predicted), pixels labelled ``ignore_index`` left
    out. A label outside 0..classes-1 (other than the ignore index) is a data error, said in one line."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= classes):
        raise UserError(f'a label map holds class {int(t.max() if t.max() >= classes else t.min())} but the network '
                        f'predicts {classes} classes (set eval.ignore_index for the pixels to leave out; now '
                        f'{ignore_index})')
    return torch.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)


def iou_scores(conf: torch.Tensor) -> dict:
    """mIoU (over the classes that occur in the labels or the predictions), pixel accuracy, both in %."""
    conf = conf.double()
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    present = union > 0
    miou = (inter[present] / union[present]).mean().item() if present.any() else 0.0
    pixels = conf.sum().item()
    return {'miou': 100.0 * miou, 'pixel_accuracy': 100.0 * conf.diag().sum().item() / max(pixels, 1),
            'classes_present': int(present.sum())}


@torch.no_grad()
def evaluate_miou(model: nn.Module, batches: Batches, device: torch.device, desc: str = 'eval',
                  progress: bool = True, dist: Dist = Dist(), ignore_index: int = 255) -> Accuracy:
    """Mean IoU over ``batches`` of (images, label maps N x H x W); scores are upsampled to the label's size
    (bilinear) when the network predicts at a lower resolution. Ranks sum one confusion matrix."""
    model.eval()
    conf, images, bad = None, 0, 0
    for x, y in tqdm(batches, desc=desc, leave=False, disable=not (progress and dist.main)):
        scores = prediction(model(x.to(device, non_blocking=True))).float()
        y = y.to(scores.device)
        if y.dim() == 4 and y.shape[1] == 1:
            y = y[:, 0]
        if scores.shape[-2:] != y.shape[-2:]:
            scores = F.interpolate(scores, size=y.shape[-2:], mode='bilinear', align_corners=False)
        bad += int(not torch.isfinite(scores).all())
        part = confusion(scores.argmax(1), y, scores.shape[1], ignore_index)
        conf = part if conf is None else conf + part
        images += len(x)
    conf = torch.zeros(1, 1, dtype=torch.long, device=device) if conf is None else conf
    flat = dist.sum(conf.flatten().tolist() + [images, bad], device)
    images, bad = int(flat[-2]), int(flat[-1])
    conf = torch.tensor(flat[:-2], dtype=torch.float64).reshape(conf.shape)
    if bad or images == 0:
        return Accuracy(None, None, images, bad, metric='miou')
    return Accuracy(None, None, images, metric='miou', scores=iou_scores(conf))


def user_metric(path: str) -> Callable:
    """``file.py:fn`` or ``package.module:fn``, called as ``fn(model, data, device) -> dict``."""
    return import_object(path, 'eval.metric')


def evaluate_user(fn: Callable, model: nn.Module, data: Any, device: torch.device, name: str) -> Accuracy:
    """The user function's dict of figures; its first entry is the headline score."""
    model.eval()
    with torch.no_grad():
        try:
            out = fn(model, data, device)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f'eval.metric {name} raised {type(exc).__name__}: {exc}') from None
    if not isinstance(out, dict) or not out or not all(isinstance(v, (int, float)) for v in out.values()):
        raise UserError(f'eval.metric {name} must return a non-empty dict of numbers, got {type(out).__name__}')
    first = next(iter(out))
    return Accuracy(None, None, len(data) if hasattr(data, '__len__') else 0, metric=first,
                    scores={k: float(v) for k, v in out.items()})


def evaluate_task(settings: EvalConfig, model: nn.Module, batches: Batches, data: Any, device: torch.device,
                  desc: str, progress: bool, dist: Dist) -> Accuracy:
    """The configured metric on the evaluation data (``batches``: this rank's share; ``data``: the whole
    evaluation data, handed to a user function as it is)."""
    if settings.metric == 'top1':
        return evaluate(model, batches, device, desc, progress, dist)
    if settings.metric == 'miou':
        return evaluate_miou(model, batches, device, desc, progress, dist, settings.ignore_index)
    if settings.metric == 'map':
        from mrecg.detection import evaluate_map
        return evaluate_map(model, batches, device, desc, progress, dist)
    return evaluate_user(user_metric(settings.metric), model, data, device, settings.metric)


def headline(acc: Optional[Accuracy], metric: str = 'top1') -> str:
    """'top-1 71.20', 'miou 64.03', 'top-1 n/a' (no evaluation: named after ``metric``) for the log and the
    summary."""
    metric = acc.metric if acc is not None else metric
    name = 'top-1' if metric == 'top1' else metric
    return f'{name} {"n/a" if acc is None or acc.score is None else format(acc.score, ".2f")}'
