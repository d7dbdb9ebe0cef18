"""Dense-prediction data nobody here wrote, offline: Fashion-MNIST items composed onto larger canvases.

Each canvas holds 2-5 items (seeded: which items, where, in which order) pasted onto black. An item's pixels
are those brighter than ``INK``; a later item covers an earlier one, and the label map and the boxes are
taken from what stays visible, so image, mask and boxes agree exactly. Label 0 is the background, item class
c is label c + 1 (11 classes). Train canvases use Fashion-MNIST's training items, val canvases its test items.
"""
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

INK = 0.1  # an item pixel brighter than this (of 1.0) belongs to the item
CLASSES = 11  # background + Fashion-MNIST's 10 classes
MEAN, STD = 0.15, 0.30  # of the composed canvases (mostly background), for normalisation
SEEDS = {'train': 11, 'val': 12}


@dataclass
class Canvases:
    images: torch.Tensor  # N x C x S x S, normalised
    masks: torch.Tensor  # N x S x S, long: 0 background, c + 1 item class c
    boxes: List[torch.Tensor]  # per canvas: K x 4 (x0, y0, x1, y1), pixel edges of each visible item
    labels: List[torch.Tensor]  # per canvas: K item labels (1..10)


def place(rng: np.random.Generator, size: int, item: int, lo: int, hi: int) -> List[Tuple[int, int]]:
    """Top-left corners of ``lo..hi`` items (uniform over the canvas)."""
    n = int(rng.integers(lo, hi + 1))
    return [(int(rng.integers(0, size - item + 1)), int(rng.integers(0, size - item + 1))) for _ in range(n)]


def compose(items: torch.Tensor, labels: torch.Tensor, count: int, size: int = 64, per_canvas=(2, 5),
            seed: int = 0, channels: int = 1) -> Canvases:
    """``count`` canvases of ``size`` x ``size`` from ``items`` (M x 28 x 28 in [0, 1]) and their ``labels``."""
    rng = np.random.default_rng(seed)
    edge = items.shape[-1]
    images = torch.zeros(count, size, size)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    all_boxes, all_labels = [], []
    for n in range(count):
        instance = torch.full((size, size), -1, dtype=torch.long)
        corners = place(rng, size, edge, *per_canvas)
        chosen = rng.integers(0, len(items), size=len(corners))
        for k, ((y, x), i) in enumerate(zip(corners, chosen)):
            item = items[int(i)]
            ink = item > INK
            images[n, y:y + edge, x:x + edge][ink] = item[ink]
            masks[n, y:y + edge, x:x + edge][ink] = int(labels[int(i)]) + 1
            instance[y:y + edge, x:x + edge][ink] = k
        boxes, kept = [], []
        for k, i in enumerate(chosen):
            ys, xs = torch.nonzero(instance == k, as_tuple=True)
            if len(ys):  # an item wholly covered by later ones has no box
                boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
                kept.append(int(labels[int(i)]) + 1)
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(torch.tensor(kept, dtype=torch.long))
    x = ((images - MEAN) / STD).unsqueeze(1).repeat(1, channels, 1, 1)
    return Canvases(x, masks, all_boxes, all_labels)


def fashion_canvases(split: str, folder=None, count=None, size: int = 64, channels: int = 1) -> Canvases:
    """The seeded canvases of ``split`` from the Fashion-MNIST files (``mrecg.data.fashion_mnist``)."""
    from mrecg.data import FASHION_FILES, FASHION_MNIST_DIR, idx_array
    items, labels = (idx_array(folder or FASHION_MNIST_DIR, f) for f in FASHION_FILES[split])
    count = count or (4000 if split == 'train' else 1000)
    return compose(torch.from_numpy(items.copy()).float() / 255.0, torch.from_numpy(labels.astype(np.int64)),
                   count, size, seed=SEEDS[split], channels=channels)
