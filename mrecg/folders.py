"""Image folders (ImageNet layout) read as torchvision's ImageFolder does, but safe on a hostile tree.

torchvision walks each class folder with ``os.walk(followlinks=True)``: a symlink back to a parent
(``ln -s . val/3/more``) is followed until the path is too long, and every image is counted once per lap
(92 files became 172 evaluation images). Here each real directory is read once, whatever links lead to it;
the links skipped are counted and said in the data summary. Samples come in torchvision's order (sorted by
folder, then by file name), so a tree without loops gives the same images in the same order as before.
"""
import os
from typing import Dict, List, Tuple

from torchvision.datasets.folder import IMG_EXTENSIONS  # the same files torchvision's ImageFolder takes


def walk_once(top: str, seen: set) -> Tuple[List[Tuple[str, List[str]]], int]:
    """``[(folder, file names)]`` under ``top`` following symlinks, each real directory once (``seen`` holds the
    ``(device, inode)`` of those read, shared across calls), and the number of links to a folder already read."""
    found, skipped, stack = [], 0, [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:  # a dangling link, or a loop the OS refuses
            skipped += 1
            continue
        if (st.st_dev, st.st_ino) in seen:
            skipped += 1
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        found.append((folder, [e.name for e in entries if e.is_file()]))
        stack.extend(e.path for e in reversed(entries) if e.is_dir())
    return found, skipped


def image_samples(root: str, class_to_idx: Dict[str, int]) -> Tuple[List[Tuple[str, int]], int]:
    """``(path, class index)`` of every image under ``root/<class>/``, and the symlinks skipped."""
    samples, skipped, seen = [], 0, set()
    for name in sorted(class_to_idx):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        found, links = walk_once(folder, seen)
        skipped += links
        for sub, files in sorted(found):
            samples += [(os.path.join(sub, f), class_to_idx[name]) for f in files if f.lower().endswith(IMG_EXTENSIONS)]
    return samples, skipped


def image_folder_dataset(folder: str, transform):
    """A torchvision ``ImageFolder`` over ``folder`` whose samples come from ``image_samples``; it carries
    ``skipped_links``. Raises ``FileNotFoundError`` when a class folder holds no image (as torchvision does)."""
    import torchvision.datasets as D

    class ImageTree(D.ImageFolder):
        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            samples, self.skipped_links = image_samples(directory, class_to_idx)
            empty = sorted(set(class_to_idx) - {os.path.relpath(p, directory).split(os.sep)[0] for p, _ in samples})
            if empty:
                raise FileNotFoundError(f'no image in the class folder(s) {", ".join(empty)} (extensions: '
                                        f'{", ".join(IMG_EXTENSIONS)})')
            return samples

    return ImageTree(folder, transform)


def folder_summary(ds) -> str:
    """``92 images, 10 classes`` (and the links skipped) of an image-folder dataset."""
    text = f'{len(ds)} images, {len(ds.classes)} classes'
    links = getattr(ds, 'skipped_links', 0)
    return text + (f' ({links} symlink(s) to a folder already read skipped: each real folder counts once)'
                   if links else '')
