"""Datasets, calibration sampling and evaluation loaders. Nothing is ever downloaded.

- ``imagenet``: ImageFolder ``{path}/train`` and ``{path}/val``; val = Resize(test_resize, short side) ->
  CenterCrop(input_size) -> ImageNet mean/std; calibration images from train, drawn with the run's seed,
  with the train transform (RandomResizedCrop + flip, seeded) or the val one (``cali_transform``).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits, a fixed seeded 1297/500 train/test split.
- ``fashion_mnist``: Zalando's 60k/10k 28x28 images, read from the four idx files of Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) or from ``data.path``.
"""
import gzip
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from mrecg.errors import UserError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                 'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_TEST = 500


@dataclass(frozen=True)
class DataSettings:
    type: str
    path: Optional[str]
    batch_size: int
    num_workers: int = 0
    pin_memory: bool = False
    input_size: int = 224
    test_resize: int = 256
    cali_transform: str = 'train'
    split_seed: int = 0
    eval_limit: Optional[int] = None


# ---- tensor datasets (digits, Fashion-MNIST) --------------------------------------------------------
def _digits(split: str, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[DIGITS_TEST:], perm[:DIGITS_TEST]
    mean, std = x[train].mean(), x[train].std()
    idx = train if split == 'train' else test
    return (x[idx] - mean) / std, y[idx]


def fashion_mnist_dir(path: Optional[str]) -> str:
    return path or FASHION_MNIST_DIR


def _idx_file(folder: str, stem: str) -> str:
    for name in (stem + '.gz', stem):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f'Fashion-MNIST file {stem}[.gz] not found in {folder} '
                    '(install it with: apt-get install -y dataset-fashion-mnist, or set data.path)')


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(split: str, folder: str) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = (_read_idx(_idx_file(folder, f)) for f in FASHION_FILES[split])
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    return (x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64))


def tensor_split(settings: DataSettings, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if settings.type == 'digits':
        return _digits(split, settings.split_seed)
    return _fashion_mnist(split, fashion_mnist_dir(settings.path))


# ---- ImageNet -----------------------------------------------------------------------------------------
def _imagenet_transform(settings: DataSettings, train: bool):
    import torchvision.transforms as T
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(settings.input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(settings.test_resize), T.CenterCrop(settings.input_size), T.ToTensor(), norm])


def _imagenet_folder(settings: DataSettings, split: str, train_transform: bool):
    import torchvision.datasets as D
    return D.ImageFolder(os.path.join(settings.path, split), _imagenet_transform(settings, train_transform))


def check_data(settings: DataSettings) -> None:
    """Fail fast, before any heavy work, when the dataset is not where the config says."""
    if settings.type == 'imagenet':
        if not settings.path:
            raise UserError('data.path is not set: point it at the ImageNet folder holding train/ and val/')
        for split in ('train', 'val'):
            folder = os.path.join(settings.path, split)
            if not os.path.isdir(folder):
                raise UserError(f'ImageNet folder not found: {folder} (data.path must hold train/ and val/)')
    elif settings.type == 'fashion_mnist':
        folder = fashion_mnist_dir(settings.path)
        for stems in FASHION_FILES.values():
            for stem in stems:
                _idx_file(folder, stem)


TRAIN_SIZES = {'digits': 1797 - DIGITS_TEST, 'fashion_mnist': 60000}


def check_calibration_size(settings: DataSettings, size: int, available: Optional[int] = None) -> None:
    available = available if available is not None else TRAIN_SIZES.get(settings.type)
    if available is not None and size > available:
        raise UserError(f'quantize.cali_size is {size} but the {settings.type} training split has {available} images')



def calibration_images(settings: DataSettings, size: int, seed: int) -> torch.Tensor:
    """``size`` training images drawn with ``seed`` (the same seed gives the same images and crops)."""
    gen = torch.Generator().manual_seed(seed)
    if settings.type != 'imagenet':
        x, _ = tensor_split(settings, 'train')
        check_calibration_size(settings, size, len(x))
        return x[torch.randperm(len(x), generator=gen)[:size]].clone()
    from torch.utils.data import DataLoader, Subset
    ds = _imagenet_folder(settings, 'train', settings.cali_transform == 'train')
    check_calibration_size(settings, size, len(ds))
    subset = Subset(ds, torch.randperm(len(ds), generator=gen)[:size].tolist())
    loader = DataLoader(subset, batch_size=settings.batch_size, shuffle=False, num_workers=settings.num_workers,
                        generator=gen, worker_init_fn=_seed_worker)
    from tqdm import tqdm
    return torch.cat([x for x, _ in tqdm(loader, desc='calibration images', leave=False)])


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it
    import random
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def eval_batches(settings: DataSettings, device: torch.device) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """Test/val batches (at most ``eval_limit`` images), pinned when they go to a GPU."""
    if settings.type != 'imagenet':
        x, y = tensor_split(settings, 'test')
        if settings.eval_limit:
            x, y = x[:settings.eval_limit], y[:settings.eval_limit]
        return _TensorBatches(x, y, settings.batch_size)
    from torch.utils.data import DataLoader, Subset
    ds = _imagenet_folder(settings, 'val', False)
    if settings.eval_limit:
        ds = Subset(ds, range(min(settings.eval_limit, len(ds))))
    return DataLoader(ds, batch_size=settings.batch_size, shuffle=False, num_workers=settings.num_workers,
                      pin_memory=settings.pin_memory and device.type == 'cuda',
                      persistent_workers=False)


class _TensorBatches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]
