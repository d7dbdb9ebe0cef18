#!/usr/bin/env python
"""Train the small float models the demo, tests and benchmarks quantize (seeded, CPU is enough).

    python scripts/train_small_models.py --dataset digits         # ~1 min on 2 cores
    python scripts/train_small_models.py --dataset fashion_mnist  # ~15 min on 2 cores
    python scripts/train_small_models.py --dataset fashion_mnist --models resnet18  # ~15 min (benchmark)
    python scripts/train_small_models.py --dataset fashion_segmentation  # ~4 min, FCN on the composed canvases
    python scripts/train_small_models.py --dataset fashion_detection     # FCOS on the canvases' boxes

Writes ``models/checkpoints/<model>_<dataset>.pth`` (a bare state dict) and prints test top-1.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from mrecg import zoo
from mrecg.config import DataConfig
from mrecg.data import dataset, eval_batches
from mrecg.evaluation import evaluate

RECIPES = {  # epochs, batch size, peak lr, weight decay
    'digits': (40, 64, 3e-3, 5e-4),
    'fashion_mnist': (8, 128, 3e-3, 5e-4),
    'fashion_segmentation': (24, 32, 3e-3, 1e-4),
    'fashion_detection': (12, 32, 2e-3, 1e-4),
}
DENSE = {'fashion_segmentation': 'fcn_resnet_small',  # dataset -> its model (mrecg.zoo.segmentation / .detection)
         'fashion_detection': 'fcos_resnet_small'}
EPOCHS = {'resnet18': 3}  # the ImageNet ResNet-18 (for mrecg bench) learns Fashion-MNIST fast
MODEL_KWARGS = {  # the configs and benchmarks pass the same kwargs
    ('mobilenet_v2_small', 'fashion_mnist'): {'stem_stride': 2},
    ('resnet_small', 'fashion_mnist'): {'stem_stride': 2},
    ('resnet18', 'fashion_mnist'): {'num_classes': 10, 'in_chans': 1},
}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to 1 pixel (digits) / 2 pixels (Fashion-MNIST), plus flips for clothes."""
    pad = 1 if x.shape[-1] <= 8 else 2
    padded = F.pad(x, (pad, pad, pad, pad), mode='replicate')
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    if x.shape[-1] > 8 and torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    return x


def fit(model_name: str, dataset_name: str, seed: int, out_dir: str, build, batch_loss, report) -> str:
    """The loop every recipe shares: seeded order, AdamW on a one-cycle schedule, a report after every epoch,
    the state dict written. ``build()`` makes the model (after seeding), ``batch_loss(model, train_set, idx, gen)``
    is one batch's loss, ``report(model, test_set, epoch, epochs)`` the epoch's test figures."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = DataConfig(type=dataset_name)
    train_set, test_set = dataset(data, 'train'), dataset(data, 'val')
    model = build()
    epochs, bs, lr, wd = RECIPES[dataset_name]
    epochs = EPOCHS.get(model_name, epochs)
    n = len(train_set)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((n + bs - 1) // bs))
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = batch_loss(model, train_set, idx, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f'{model_name} {dataset_name} epoch {epoch + 1}/{epochs} loss {total / n:.4f}'
              f'{report(model, test_set, epoch, epochs)} ({time.time() - t0:.0f} s)', flush=True)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f'{model_name}_{dataset_name}.pth')
    torch.save(model.state_dict(), path)
    print(f'wrote {path}')
    return path


def train(model_name: str, dataset_name: str, seed: int, out_dir: str) -> str:
    """A classifier: cross-entropy with label smoothing on shifted (and, for clothes, flipped) images."""
    def batch_loss(model, data, idx, gen):
        return F.cross_entropy(model(augment(data.images[idx], gen)), data.labels[idx], label_smoothing=0.05)

    def report(model, test_set, epoch, epochs):
        acc = evaluate(model, eval_batches(test_set, 512), torch.device('cpu'), progress=False)
        return f' test top-1 {acc.top1:.2f}'
    return fit(model_name, dataset_name, seed, out_dir, lambda: zoo.build_model(
        model_name, **MODEL_KWARGS.get((model_name, dataset_name), {})), batch_loss, report)


def train_segmentation(model_name: str, dataset_name: str, seed: int, out_dir: str) -> str:
    """Per-pixel cross-entropy with horizontal flips; the test mIoU after each epoch."""
    from mrecg.metrics import evaluate_miou
    from mrecg.zoo import segmentation

    def batch_loss(model, data, idx, gen):
        x, y = data.images[idx], data.labels[idx]
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return F.cross_entropy(model(x)['out'], y)

    def report(model, test_set, epoch, epochs):
        acc = evaluate_miou(model, eval_batches(test_set, 256), torch.device('cpu'), progress=False)
        return f' test mIoU {acc.score:.2f} pixel accuracy {acc.scores["pixel_accuracy"]:.2f}'
    return fit(model_name, dataset_name, seed, out_dir, getattr(segmentation, model_name), batch_loss, report)


def train_detection(model_name: str, dataset_name: str, seed: int, out_dir: str) -> str:
    """FCOS's own losses with horizontal flips; the test mAP after every other epoch."""
    from mrecg.detection import evaluate_map
    from mrecg.zoo import detection

    def batch_loss(model, data, idx, gen):
        images, targets = data.images[idx], [data.targets[j] for j in idx.tolist()]
        if torch.rand((), generator=gen) < 0.5:
            size = images.shape[-1]
            images = images.flip(-1)
            targets = [{**t, 'boxes': t['boxes'][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1])
                        + torch.tensor([size, 0.0, size, 0])} for t in targets]
        return sum(model(list(images), targets).values())

    def report(model, test_set, epoch, epochs):
        if not (epoch % 2 or epoch == epochs - 1):
            return ''
        acc = evaluate_map(model, eval_batches(test_set, 64), torch.device('cpu'), progress=False)
        return f' test mAP {acc.score:.2f} mAP@.5 {acc.scores["map_50"]:.2f}'
    return fit(model_name, dataset_name, seed, out_dir, getattr(detection, model_name), batch_loss, report)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', choices=sorted(RECIPES), required=True)
    parser.add_argument('--models', nargs='+', help='default: mobilenet_v2_small resnet_small (segmentation: '
                                                    'fcn_resnet_small, detection: fcos_resnet_small)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out-dir', default=os.path.join('models', 'checkpoints'))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dense = DENSE.get(args.dataset)
    trainer = {'fashion_segmentation': train_segmentation, 'fashion_detection': train_detection}.get(args.dataset, train)
    for name in args.models or ([dense] if dense else ['mobilenet_v2_small', 'resnet_small']):
        trainer(name, args.dataset, args.seed, args.out_dir)


if __name__ == '__main__':
    main()
