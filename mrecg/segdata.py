"""PASCAL VOC-style segmentation folders (``data.type: voc``): what users of DeepLabV3 / FCN / LR-ASPP have.

    {data.path}/JPEGImages/<id>.jpg                 the images (any format Pillow reads)
    {data.path}/SegmentationClass/<id>.png          label maps: class indices, 255 = ignore (VOC's borders)
    {data.path}/ImageSets/Segmentation/train.txt    ids of the calibration split, one per line
    {data.path}/ImageSets/Segmentation/val.txt      ids of the evaluation split (optional)

Items are (image, label map): the image resized to ``data.input_size`` squared (bilinear) and normalised with
``data.mean``/``data.std``, the label map resized alike with nearest neighbours (classes never blend).
Calibration images are flipped at random (seeded) with ``cali_transform: train``. A palette PNG gives its
indices, as VOC's are stored; an RGB label map is refused (it holds colours, not classes).
"""
import os
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mrecg.config import DataConfig
from mrecg.errors import UserError

IMAGES, LABELS, SPLITS = 'JPEGImages', 'SegmentationClass', os.path.join('ImageSets', 'Segmentation')
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def split_ids(root: str, split: str) -> Optional[List[str]]:
    path = os.path.join(root, SPLITS, f'{split}.txt')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def image_path(root: str, sample_id: str) -> str:
    for ext in IMAGE_EXTS:
        path = os.path.join(root, IMAGES, sample_id + ext)
        if os.path.isfile(path):
            return path
    raise UserError(f'no image for id {sample_id!r} in {os.path.join(root, IMAGES)} (looked for '
                    f'{", ".join(IMAGE_EXTS)})')


def check_voc(cfg: DataConfig) -> None:
    """Fail fast when the folder is not VOC-shaped."""
    if not cfg.path:
        raise UserError('data.path is not set: point it at the VOC folder (JPEGImages/, SegmentationClass/, '
                        'ImageSets/Segmentation/train.txt)')
    for need in (IMAGES, LABELS, os.path.join(SPLITS, 'train.txt')):
        if not os.path.exists(os.path.join(cfg.path, need)):
            raise UserError(f'{os.path.join(cfg.path, need)} not found: data.type voc needs JPEGImages/, '
                            'SegmentationClass/ and ImageSets/Segmentation/train.txt under data.path')


class VOCSegmentation(Dataset):
    def __init__(self, root: str, ids: List[str], size: int, mean, std, flip: bool):
        self.root, self.ids, self.size, self.flip = root, ids, size, flip
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def label_map(self, sample_id: str) -> torch.Tensor:
        from PIL import Image
        path = os.path.join(self.root, LABELS, sample_id + '.png')
        with Image.open(path) as im:
            if im.mode not in ('P', 'L', 'I', 'I;16'):
                raise UserError(f'{path} is a {im.mode} image: label maps must hold class indices (palette or '
                                'grey PNG), not colours')
            return torch.from_numpy(np.array(im, dtype=np.int64))

    def __getitem__(self, i):
        from PIL import Image
        sample_id = self.ids[i]
        with Image.open(image_path(self.root, sample_id)) as im:
            image = torch.from_numpy(np.array(im.convert('RGB'), dtype=np.float32)).permute(2, 0, 1) / 255.0
        label = self.label_map(sample_id)
        if label.shape != image.shape[1:]:
            raise UserError(f'label map of {sample_id!r} is {tuple(label.shape)} but its image is '
                            f'{tuple(image.shape[1:])}')
        image = F.interpolate(image[None], size=(self.size, self.size), mode='bilinear', align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=(self.size, self.size), mode='nearest')[0, 0].long()
        if self.flip and torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return (image - self.mean) / self.std, label


def voc_segmentation(cfg: DataConfig, split: str) -> Optional[Dataset]:
    """The ``train`` or ``val`` split; None for a split the folder does not list."""
    ids = split_ids(cfg.path, split)
    if ids is None:
        return None
    flip = split == 'train' and cfg.cali_transform == 'train'
    return VOCSegmentation(cfg.path, ids, cfg.input_size, cfg.mean, cfg.std, flip)
