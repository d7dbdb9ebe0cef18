"""Data: the built-in datasets, ImageFolder, user factories, and whatever the Python API is handed.

Sources (``data.type``), each giving map-style datasets of ``(image tensor, label)``:

- ``imagenet`` / ``imagefolder``: ``{path}/train`` and ``{path}/val`` in ImageFolder layout; val = Resize
  (``test_resize``, short side) -> CenterCrop(``input_size``) -> ``mean``/``std``; calibration images from
  train with the train transform (RandomResizedCrop + flip, seeded) or the val one (``cali_transform``).
  ``imagefolder`` without a ``val/`` folder quantizes without evaluation.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits, a fixed seeded 1297/500 train/test split.
- ``fashion_mnist``: Zalando's 60k/10k 28x28 images, read from the four idx files of Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) or from ``data.path``.
- ``fashion_segmentation``: those items composed onto 64x64 canvases, with exact label maps (``mrecg.canvases``).
- ``voc``: a PASCAL VOC-style segmentation folder (``mrecg.segdata``): images, PNG label maps, 255 = ignore.
- ``fashion_detection`` (the canvases with their boxes) and ``coco`` (COCO-format JSON + images), items
  (image, target dict) for detectors (``mrecg.detection``).
- a factory ``package.module:make`` or ``path/to/file.py:make``, called as ``make(split, **data.kwargs)``
  with split ``train`` (calibration) or ``val`` (evaluation; ``None`` = no evaluation).

Nothing is ever downloaded. Calibration images are drawn with the run's seed, so the same seed gives the
same images (and crops).
"""
import contextlib
import gzip
import os
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mrecg.config import DataConfig
from mrecg.errors import UserError
from mrecg.imports import first_line, import_object, is_import_path

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                 'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
DIGITS_TEST = 500
FOLDER_TYPES = ('imagenet', 'imagefolder')


class TensorData(Dataset):
    """Images and labels already in memory; batches are slices (no per-item collation)."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])


# ---- built-in tensor datasets ------------------------------------------------------------------------
def digits(split: str, seed: int) -> TensorData:
    try:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    except ImportError:
        raise UserError('data.type digits needs scikit-learn (it ships the digits): pip install scikit-learn') \
            from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[DIGITS_TEST:], perm[:DIGITS_TEST]
    mean, std = x[train].mean(), x[train].std()
    idx = train if split == 'train' else test
    return TensorData((x[idx] - mean) / std, y[idx])


def _idx_file(folder: str, stem: str) -> str:
    for name in (stem + '.gz', stem):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f'Fashion-MNIST file {stem}[.gz] not found in {folder} '
                    '(install it with: apt-get install -y dataset-fashion-mnist, or set data.path)')


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, IndexError, ValueError) as exc:
        raise UserError(f'cannot read {path}: {first_line(exc)} (a truncated or foreign file?)') from None


def idx_array(folder: str, stem: str) -> np.ndarray:
    """One Fashion-MNIST idx file of ``folder`` as an array."""
    return _read_idx(_idx_file(folder, stem))


def fashion_mnist(split: str, folder: Optional[str]) -> TensorData:
    images, labels = (idx_array(folder or FASHION_MNIST_DIR, f) for f in FASHION_FILES[split])
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    return TensorData((x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64)))


# ---- folders and factories ---------------------------------------------------------------------------
def folder_transform(cfg: DataConfig, train: bool):
    import torchvision.transforms as T
    norm = T.Normalize(cfg.mean, cfg.std)
    if train:
        return T.Compose([T.RandomResizedCrop(cfg.input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(cfg.test_resize), T.CenterCrop(cfg.input_size), T.ToTensor(), norm])


def image_folder(cfg: DataConfig, split: str, train_transform: bool) -> Optional[Dataset]:
    from mrecg.folders import image_folder_dataset
    folder = os.path.join(cfg.path, split)
    if not os.path.isdir(folder):
        return None
    try:
        return image_folder_dataset(folder, folder_transform(cfg, train_transform))
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f'cannot use {folder} as an image folder: {first_line(exc)}') from None


def from_factory(cfg: DataConfig, split: str) -> Optional[Dataset]:
    make = import_object(cfg.type, 'data.type')
    try:
        ds = make(split, **cfg.kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f'data factory {cfg.type}({split!r}) raised {type(exc).__name__}: {first_line(exc)}') \
            from None
    if ds is None:
        return None
    if not (hasattr(ds, '__getitem__') and hasattr(ds, '__len__')):
        raise UserError(f'data factory {cfg.type}({split!r}) returned {type(ds).__name__}: it must return a '
                        'map-style Dataset (with __getitem__ and __len__) of (image tensor, label)')
    return ds


def dataset(cfg: DataConfig, split: str) -> Optional[Dataset]:
    """The ``train`` (calibration) or ``val`` (evaluation) dataset of the config; None when there is none."""
    if cfg.type == 'digits':
        return digits(split, cfg.split_seed)
    if cfg.type == 'fashion_mnist':
        return fashion_mnist(split, cfg.path)
    if cfg.type in FOLDER_TYPES:
        return image_folder(cfg, split, split == 'train' and cfg.cali_transform == 'train')
    if cfg.type == 'fashion_segmentation':
        return fashion_segmentation(split, cfg)
    if cfg.type == 'voc':
        from mrecg.segdata import voc_segmentation
        return voc_segmentation(cfg, split)
    if cfg.type == 'fashion_detection':
        from mrecg.detection import fashion_detection
        return fashion_detection(split, cfg)
    if cfg.type == 'coco':
        from mrecg.detection import coco_detection
        return coco_detection(cfg, split)
    return from_factory(cfg, split)


CANVAS_KWARGS = ('count', 'size', 'channels')


def fashion_segmentation(split: str, cfg: DataConfig) -> TensorData:
    """Fashion-MNIST items composed onto canvases, with their label maps (``mrecg.canvases``); data.kwargs may
    set count, size (64) and channels (1; 3 for torchvision's networks)."""
    from mrecg.canvases import fashion_canvases
    unknown = sorted(set(cfg.kwargs) - set(CANVAS_KWARGS))
    if unknown:
        raise UserError(f'data.kwargs: fashion_segmentation takes {", ".join(CANVAS_KWARGS)}, not {unknown[0]!r}')
    c = fashion_canvases(split, cfg.path, **cfg.kwargs)
    return TensorData(c.images, c.masks)


def data_summary(train: Any, val: Any) -> str:
    """The data line of the log: images per split (and, for image folders, classes and skipped links)."""
    from mrecg.folders import folder_summary

    def one(ds):
        return folder_summary(ds) if hasattr(ds, 'classes') and hasattr(ds, 'samples') else f'{len(ds)} images'
    return f'calibration split {one(train)}; ' + (f'evaluation split {one(val)}' if val is not None else
                                                  'no evaluation split')


def check_data(cfg: DataConfig) -> None:
    """Fail fast, before any heavy work, when the dataset is not where the config says."""
    if cfg.type in FOLDER_TYPES:
        if not cfg.path:
            raise UserError(f'data.path is not set: point it at the {cfg.type} folder holding train/ and val/')
        required = ('train', 'val') if cfg.type == 'imagenet' and cfg.evaluate else ('train',)
        for split in required:
            folder = os.path.join(cfg.path, split)
            if not os.path.isdir(folder):
                name = 'ImageNet' if cfg.type == 'imagenet' else 'image'
                raise UserError(f'{name} folder not found: {folder} (data.path must hold train/ and val/)')
    elif cfg.type == 'voc':
        from mrecg.segdata import check_voc
        check_voc(cfg)
    elif cfg.type == 'coco':
        from mrecg.detection import check_coco
        check_coco(cfg)
    elif cfg.type in ('fashion_mnist', 'fashion_segmentation', 'fashion_detection'):
        for stems in FASHION_FILES.values():
            for stem in stems:
                _idx_file(cfg.path or FASHION_MNIST_DIR, stem)
    elif is_import_path(cfg.type):
        import_object(cfg.type, 'data.type')


def image_of(item: Any) -> Any:
    """The image of a dataset item or batch: the first element of ``(image, label)``, or the item itself."""
    return item[0] if isinstance(item, (tuple, list)) else item


def check_items(ds: Dataset, what: str, labelled: bool) -> None:
    """Read the first item and check its form: ``(image tensor C x H x W, label)`` (a bare tensor is enough
    for calibration)."""
    if len(ds) == 0:
        raise UserError(f'{what} is empty')
    with reading(f'{what} item 0'):
        item = ds[0]
    image = image_of(item)
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise UserError(f'{what} items must be (image tensor of shape C x H x W, float, label); item 0 holds {got}')
    if labelled and not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise UserError(f'{what} items must be (image tensor, label) pairs for evaluation; item 0 has no label')


@contextlib.contextmanager
def reading(what: str):
    """Turn a failure inside the user's data (a corrupt image, a factory's __getitem__ raising) into one line."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise UserError(f'cannot read {what}: {type(exc).__name__}: {first_line(exc)}') from None


# ---- calibration images from anything ----------------------------------------------------------------
CalibData = Union[torch.Tensor, Dataset, DataLoader]


def calibration_images(data: CalibData, size: int, seed: int, batch_size: int = 256,
                       num_workers: int = 0) -> torch.Tensor:
    """``size`` images from ``data`` (a tensor N x C x H x W, a map-style Dataset or a DataLoader), drawn with
    ``seed`` (a DataLoader gives its first ``size`` images, in its order)."""
    if isinstance(data, DataLoader):
        return _from_loader(data, size)
    if isinstance(data, torch.Tensor):
        data = TensorData(data)
    if not (hasattr(data, '__getitem__') and hasattr(data, '__len__')):
        raise UserError(f'calibration data must be a tensor of images, a Dataset or a DataLoader, '
                        f'got {type(data).__name__}')
    if size > len(data):
        raise UserError(f'quantize.cali_size is {size} but the calibration data has {len(data)} images')
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=gen)[:size]
    if isinstance(data, TensorData):
        return data.images[index].clone()
    loader = DataLoader(torch.utils.data.Subset(data, index.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, generator=gen, worker_init_fn=_seed_worker,
                        collate_fn=getattr(data, 'collate_fn', None))
    with torch.random.fork_rng(devices=[]), reading('calibration data'):
        torch.manual_seed(seed)  # random crops in this process (num_workers = 0) follow the seed too
        return torch.cat([_images_of(batch) for batch in loader])


def _from_loader(loader: DataLoader, size: int) -> torch.Tensor:
    chunks, have = [], 0
    with reading('calibration data'):
        for batch in loader:
            chunks.append(_images_of(batch))
            have += len(chunks[-1])
            if have >= size:
                break
    if have < size:
        raise UserError(f'quantize.cali_size is {size} but the calibration DataLoader gave {have} images')
    return torch.cat(chunks)[:size]


def _images_of(batch: Any) -> torch.Tensor:
    images = image_of(batch)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise UserError('calibration batches must hold images as an N x C x H x W tensor (or (images, labels))')
    return images.float()


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it
    import random
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


# ---- evaluation batches from anything ----------------------------------------------------------------
EvalData = Union[Dataset, DataLoader, Tuple[torch.Tensor, torch.Tensor]]


def eval_sample(n: int, limit: Optional[int], seed: int = 0) -> torch.Tensor:
    """Indices of at most ``limit`` of ``n`` images: a seeded uniform sample (``data.split_seed``), so a
    class-sorted folder gives every class in proportion, not the first classes only; ascending order. The
    same for every form the data comes in (labels are not read: that would decode every image). No limit,
    or one >= n: every image."""
    if not limit or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def eval_batches(data: EvalData, batch_size: int = 256, limit: Optional[int] = None, num_workers: int = 0,
                 pin_memory: bool = False, part: Tuple[int, int] = (0, 1),
                 seed: int = 0) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """Labelled batches: a Dataset or an (images, labels) pair, limited to ``limit`` images drawn by
    ``eval_sample`` (seeded, uniform); a DataLoader is used as it is. ``part = (rank, world)`` keeps
    every world-th image from ``rank`` on (every world-th batch of a DataLoader, which each rank then still
    reads in full)."""
    rank, world = part
    if isinstance(data, DataLoader):
        return data if world == 1 else (b for i, b in enumerate(data) if i % world == rank)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = TensorData(*data)
    if isinstance(data, TensorData):
        x, y = data.images, data.labels
        if y is None:
            raise UserError('evaluation data needs labels: pass (images, labels)')
        if limit and limit < len(x):
            idx = eval_sample(len(x), limit, seed)
            x, y = x[idx], ([y[i] for i in idx.tolist()] if isinstance(y, list) else y[idx])
        return TensorBatches(x[rank::world], y[rank::world], batch_size)
    if not (hasattr(data, '__getitem__') and hasattr(data, '__len__')):
        raise UserError(f'evaluation data must be a Dataset, a DataLoader or (images, labels), '
                        f'got {type(data).__name__}')
    collate = getattr(data, 'collate_fn', None)  # detection data: targets stay a list
    if limit or world > 1:
        idx = eval_sample(len(data), limit, seed)
        data = torch.utils.data.Subset(data, idx[rank::world].tolist())
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate)


class TensorBatches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]


def sample_input(data: Union[CalibData, Sequence]) -> Optional[torch.Tensor]:
    """One image batch of shape 1 x C x H x W from the calibration data (for shape checks), or None."""
    if isinstance(data, torch.Tensor):
        return data[:1]
    if isinstance(data, DataLoader):
        return None
    with reading('calibration data item 0'):
        image = image_of(data[0])
    return image.unsqueeze(0) if isinstance(image, torch.Tensor) else None
