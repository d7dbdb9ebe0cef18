"""Top-1 / top-5 accuracy, and the record every task metric fills (``Accuracy``). A model that emits NaN/Inf
outputs gets no score (None), never a number."""
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from mrecg.distributed import Dist


@dataclass(frozen=True)
class Accuracy:
    """A model's score on the evaluation data. ``metric`` names the headline figure (``score``): ``top1`` for a
    classifier, ``miou`` for a segmentation network, a user function's first key; ``scores`` holds every figure
    a non-top-1 metric gives (top1/top5 are then None)."""
    top1: Optional[float]
    top5: Optional[float]
    images: int
    nonfinite_batches: int = 0
    metric: str = 'top1'
    scores: Dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> Optional[float]:
        return self.top1 if self.metric == 'top1' else self.scores.get(self.metric)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             desc: str = 'eval', progress: bool = True, dist: Dist = Dist()) -> Accuracy:
    """Top-1/top-5 over ``batches``; in a data-parallel run each rank passes its share and the counts are
    summed over ranks."""
    model.eval()
    correct1 = correct5 = total = bad = 0
    for x, y in tqdm(batches, desc=desc, leave=False, disable=not (progress and dist.main)):
        logits = model(x.to(device, non_blocking=True))
        if not isinstance(logits, torch.Tensor):
            from mrecg.errors import UserError
            raise UserError(f'eval.metric top1 needs class scores but the network returns a {type(logits).__name__}: '
                            'set eval.metric to miou (segmentation), map (detection) or your function')
        logits = logits.float()
        y = y.to(logits.device)
        if not torch.isfinite(logits).all():
            bad += 1
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        total += len(y)
    correct1, correct5, total, bad = (int(v) for v in dist.sum([correct1, correct5, total, bad], device))
    if bad or total == 0:
        return Accuracy(None, None, total, bad)
    return Accuracy(100.0 * correct1 / total, 100.0 * correct5 / total, total)


def check_logits(model: nn.Module, sample: torch.Tensor, name: str) -> None:
    """Before any work: the model returns one tensor (the class scores), not a tuple or a dict, so a wrong
    output is blamed on the model, once, and not on the data hours later. A forward that raises is left to the
    calibration, which reports it."""
    from mrecg.errors import UserError
    try:
        device = next((p.device for p in model.parameters()), sample.device)
        with torch.no_grad():
            out = model(sample.to(device))
    except Exception:
        return
    if isinstance(out, torch.Tensor):
        return
    kind = type(out).__name__
    inside = (f' with keys {", ".join(map(repr, list(out)[:4]))}' if isinstance(out, dict) else
              f' of {len(out)}' if isinstance(out, (tuple, list)) else '')
    pick = "out['logits']" if isinstance(out, dict) else 'out[0]'
    raise UserError(f'model {name} returns a {kind}{inside}, not one tensor of class scores: wrap it so forward '
                    f'returns the logits (e.g. return {pick}) and give the wrapper as model.type '
                    '(path/to/file.py:Wrapper)')
