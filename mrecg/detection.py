"""Detection data and its metric: COCO-format folders, the composed Fashion-MNIST canvases with their boxes, and
COCO mAP through pycocotools (``eval.metric: map``).

Items are ``(image, target)``: the image in [0, 1] (torchvision's detectors normalise it themselves), resized to
``data.input_size`` squared so every batch reaches the backbone at one size, and the target a dict of ``boxes``
(K x 4, x0 y0 x1 y1 in the resized image), ``labels`` (K category ids) and ``iscrowd``. mAP is computed in the
resized coordinates: IoU does not change when both boxes are scaled alike.
"""
import json
import os
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from mrecg.config import DataConfig
from mrecg.data import TensorData
from mrecg.distributed import Dist
from mrecg.errors import UserError
from mrecg.evaluation import Accuracy


def collate(batch: List[Any]):
    """Images stacked, targets kept as a list (each image has its own number of boxes)."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


class TargetList(TensorData):
    """Images in memory with one target dict each (``labels``); batches are slices, the targets a list."""
    collate_fn = staticmethod(collate)

    def __init__(self, images: torch.Tensor, targets: List[Dict[str, torch.Tensor]]):
        super().__init__(images, list(targets))

    @property
    def targets(self) -> List[Dict[str, torch.Tensor]]:
        return self.labels


def fashion_detection(split: str, cfg: DataConfig) -> TargetList:
    """The composed canvases (``mrecg.canvases``) with their exact boxes, images in [0, 1]; data.kwargs may set
    count, size (64) and channels (1; 3 for torchvision's detectors)."""
    from mrecg.canvases import MEAN, STD, fashion_canvases
    from mrecg.data import CANVAS_KWARGS
    unknown = sorted(set(cfg.kwargs) - set(CANVAS_KWARGS))
    if unknown:
        raise UserError(f'data.kwargs: fashion_detection takes {", ".join(CANVAS_KWARGS)}, not {unknown[0]!r}')
    c = fashion_canvases(split, cfg.path, **cfg.kwargs)
    targets = [{'boxes': b, 'labels': lab, 'iscrowd': torch.zeros(len(lab), dtype=torch.long)}
               for b, lab in zip(c.boxes, c.labels)]
    return TargetList(c.images * STD + MEAN, targets)


class CocoDetection(Dataset):
    """A COCO-format annotation file and its image folder (``data.path``/``{split}.json`` and
    ``data.path``/``{split}/``), e.g. COCO's instances_val2017.json renamed to val.json beside val/."""
    collate_fn = staticmethod(collate)

    def __init__(self, images: str, annotations: str, size: int, flip: bool):
        try:
            with open(annotations, encoding='utf-8') as f:
                coco = json.load(f)
            self.entries = sorted(coco['images'], key=lambda e: e['id'])
            boxes: Dict[int, list] = {e['id']: [] for e in self.entries}
            for a in coco['annotations']:
                boxes.setdefault(a['image_id'], []).append(a)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f'cannot read {annotations} as COCO annotations: {type(exc).__name__}: {exc}') from None
        self.folder, self.boxes, self.size, self.flip = images, boxes, size, flip

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        from PIL import Image
        entry = self.entries[i]
        with Image.open(os.path.join(self.folder, entry['file_name'])) as im:
            image = torch.from_numpy(np.array(im.convert('RGB'), dtype=np.float32)).permute(2, 0, 1) / 255.0
        h, w = image.shape[1:]
        image = F.interpolate(image[None], size=(self.size, self.size), mode='bilinear', align_corners=False)[0]
        anns = [a for a in self.boxes.get(entry['id'], []) if a['bbox'][2] > 0 and a['bbox'][3] > 0]
        scale = torch.tensor([self.size / w, self.size / h] * 2)
        xywh = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * scale
        if self.flip and torch.rand(()) < 0.5:
            image, boxes = image.flip(-1), boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + \
                torch.tensor([self.size, 0, self.size, 0])
        return image, {'boxes': boxes, 'labels': torch.tensor([a['category_id'] for a in anns], dtype=torch.long),
                       'iscrowd': torch.tensor([a.get('iscrowd', 0) for a in anns], dtype=torch.long)}


def coco_detection(cfg: DataConfig, split: str) -> Optional[CocoDetection]:
    annotations = os.path.join(cfg.path, f'{split}.json')
    if not os.path.isfile(annotations):
        return None
    return CocoDetection(os.path.join(cfg.path, split), annotations, cfg.input_size,
                         split == 'train' and cfg.cali_transform == 'train')


def check_coco(cfg: DataConfig) -> None:
    if not cfg.path:
        raise UserError('data.path is not set: point it at the folder holding train.json and train/ (COCO format)')
    for need in ('train.json', 'train'):
        if not os.path.exists(os.path.join(cfg.path, need)):
            raise UserError(f'{os.path.join(cfg.path, need)} not found: data.type coco needs train.json and train/ '
                            '(and val.json, val/ for evaluation) under data.path')


# ---- mAP -------------------------------------------------------------------------------------------------------
def coco_ground_truth(targets: List[Dict[str, torch.Tensor]], size) -> dict:
    images, annotations, categories = [], [], set()
    for image_id, t in enumerate(targets):
        images.append({'id': image_id, 'height': int(size[0]), 'width': int(size[1])})
        for box, label, crowd in zip(t['boxes'].tolist(), t['labels'].tolist(), t['iscrowd'].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id, 'category_id': int(label),
                                'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': (x1 - x0) * (y1 - y0),
                                'iscrowd': int(crowd)})
            categories.add(int(label))
    return {'images': images, 'annotations': annotations, 'categories': [{'id': c} for c in sorted(categories)]}


def coco_map(targets, detections, size) -> Dict[str, float]:
    """COCOeval's bbox statistics (in %): mAP@[.5:.95], mAP@.5, mAP@.75."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UserError('eval.metric map needs pycocotools: pip install pycocotools') from None
    import contextlib
    import io
    gt = COCO()
    gt.dataset = coco_ground_truth(targets, size)
    results = [{'image_id': i, 'category_id': int(c), 'bbox': [x0, y0, x1 - x0, y1 - y0], 'score': float(s)}
               for i, d in enumerate(detections)
               for (x0, y0, x1, y1), c, s in zip(d['boxes'].tolist(), d['labels'].tolist(), d['scores'].tolist())]
    if not gt.dataset['annotations'] or not results:
        return {'map': 0.0, 'map_50': 0.0, 'map_75': 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        found = gt.loadRes(results)
        run = COCOeval(gt, found, 'bbox')
        run.evaluate()
        run.accumulate()
        run.summarize()
    return {name: 100.0 * max(float(run.stats[i]), 0.0) for i, name in enumerate(('map', 'map_50', 'map_75'))}


@torch.no_grad()
def evaluate_map(model: torch.nn.Module, batches: Iterable, device: torch.device, desc: str = 'eval',
                 progress: bool = True, dist: Dist = Dist()) -> Accuracy:
    """COCO mAP of a torchvision-style detector (``model(list of images)`` -> dicts of boxes, labels, scores) over
    ``batches`` of (images, target dicts). A data-parallel run gathers every rank's detections on each rank."""
    model.eval()
    targets, detections, size, bad = [], [], None, 0
    for x, ys in tqdm(batches, desc=desc, leave=False, disable=not (progress and dist.main)):
        out = model(list(x.to(device, non_blocking=True)))
        if not (isinstance(out, (list, tuple)) and all(isinstance(d, dict) and 'boxes' in d for d in out)):
            raise UserError('eval.metric map needs a detector that returns one dict of boxes, labels and scores per '
                            f'image (torchvision style); the network returned a {type(out).__name__}')
        bad += int(not all(torch.isfinite(d['boxes']).all() and torch.isfinite(d['scores']).all() for d in out))
        detections += [{k: d[k].cpu() for k in ('boxes', 'labels', 'scores')} for d in out]
        targets += [{k: t[k].cpu() for k in ('boxes', 'labels', 'iscrowd')} for t in ys]
        size = x.shape[-2:]
    if dist.enabled:
        targets = [t for part in dist.gather(targets) for t in part]
        detections = [d for part in dist.gather(detections) for d in part]
        bad = sum(dist.gather(bad))
    if bad or not targets:
        return Accuracy(None, None, len(targets), bad, metric='map')
    return Accuracy(None, None, len(targets), metric='map', scores=coco_map(targets, detections, size))
