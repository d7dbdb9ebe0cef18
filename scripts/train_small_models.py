#!/usr/bin/env python
"""Train the small float models the demo, tests and benchmarks quantize (seeded, CPU is enough).

    python scripts/train_small_models.py --dataset digits         # ~1 min on 2 cores
    python scripts/train_small_models.py --dataset fashion_mnist  # ~15 min on 2 cores
    python scripts/train_small_models.py --dataset fashion_mnist --models resnet18  # ~15 min (benchmark)

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
}
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


def train(model_name: str, dataset_name: str, seed: int, out_dir: str) -> str:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = DataConfig(type=dataset_name)
    train_set, test_set = dataset(data, 'train'), dataset(data, 'val')
    x, y = train_set.images, train_set.labels
    model = zoo.build_model(model_name, **MODEL_KWARGS.get((model_name, dataset_name), {}))
    epochs, bs, lr, wd = RECIPES[dataset_name]
    epochs = EPOCHS.get(model_name, epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * ((len(x) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = evaluate(model, eval_batches(test_set, 512), torch.device('cpu'), progress=False)
        print(f'{model_name} {dataset_name} epoch {epoch + 1}/{epochs} loss {total / len(x):.4f} '
              f'test top-1 {acc.top1:.2f} ({time.time() - t0:.0f} s)', flush=True)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f'{model_name}_{dataset_name}.pth')
    torch.save(model.state_dict(), path)
    print(f'wrote {path}')
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', choices=sorted(RECIPES), required=True)
    parser.add_argument('--models', nargs='+', default=['mobilenet_v2_small', 'resnet_small'])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out-dir', default=os.path.join('models', 'checkpoints'))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in args.models:
        train(name, args.dataset, args.seed, args.out_dir)


if __name__ == '__main__':
    main()
