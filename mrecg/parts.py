"""A sub-module as the quantized part (``model.quantize_part``): a segmentation network's backbone, a detector's
backbone + FPN, any named ``nn.Module`` inside a user's network.

The part is prepared, calibrated, grouped and reconstructed like a whole model; the rest of the network stays
float. Its calibration inputs are what the part really receives: the whole network runs on the user's images
with a forward pre-hook on the part, so the network's own pre-processing (a detector's resize, normalisation
and padding) applies. Evaluation runs the whole network with the quantized part put back in its place.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from mrecg import tracing
from mrecg.errors import UserError


def find_part(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at ``path`` (``backbone``, ``backbone.body``); a wrong name lists what there is."""
    found = dict(model.named_modules())
    if path in found and path:
        return found[path]
    parent, _, _ = path.rpartition('.')
    siblings = [n for n, _ in (found[parent].named_children() if parent in found else model.named_children())]
    prefix = f'{parent}.' if parent in found and parent else ''
    raise UserError(f'model.quantize_part {path!r} is not a sub-module of {type(model).__name__}; '
                    f'{("its children are: " if not prefix else f"{parent} holds: ")}'
                    f'{", ".join(prefix + s for s in siblings[:12]) or "(none)"}')


def put_part(model: nn.Module, path: str, part: nn.Module) -> nn.Module:
    """``model`` with the sub-module at ``path`` replaced by ``part`` (in place; returns ``model``)."""
    parent, _, name = path.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, name, part)
    return model


@torch.no_grad()
def capture_inputs(model: nn.Module, path: str, images: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """The part's input for every image: the whole network's forward on ``images`` in batches, the part's
    first positional argument caught by a pre-hook (on the CPU, like the calibration images)."""
    part = find_part(model, path)
    caught: List[torch.Tensor] = []

    def hook(_module, args, kwargs):
        tensors = list(args) + list(kwargs.values())
        if len(tensors) != 1 or not isinstance(tensors[0], torch.Tensor):
            kinds = ', '.join(type(t).__name__ for t in tensors) or 'nothing'
            raise UserError(f'model.quantize_part {path!r} is called with {kinds}; the part must take one '
                            'tensor (choose the module that receives the image batch, e.g. backbone)')
        caught.append(tensors[0].detach().cpu())

    handle = part.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval().to(device)
    try:
        for i in range(0, len(images), batch_size):
            before = len(caught)
            model(images[i:i + batch_size].to(device))
            if len(caught) == before:
                raise UserError(f'model.quantize_part {path!r} is never called by the network\'s forward: '
                                'name a module the forward uses')
            if len(caught) > before + 1:
                raise UserError(f'model.quantize_part {path!r} is called {len(caught) - before} times per '
                                'forward: name a module the network calls once')
    finally:
        handle.remove()
        model.train(was_training)
    shapes = sorted({tuple(t.shape[1:]) for t in caught})
    if len(shapes) > 1:
        raise UserError(f'model.quantize_part {path!r} receives inputs of different sizes {shapes[:3]}: give the '
                        'network images of one size (data.input_size), so every batch reaches the part alike')
    return torch.cat(caught)


def untraceable_op(part: nn.Module) -> Optional[str]:
    """None when torch.fx traces ``part``, else ``mrecg.tracing``'s line naming the module and the op."""
    try:
        tracing.check_traceable(part)
    except UserError as exc:
        return str(exc)
    return None


def largest_traceable(model: nn.Module, path: str) -> Optional[str]:
    """The sub-module of ``path`` with the most parameters that torch.fx traces (what to quantize instead)."""
    part = find_part(model, path) if path else model
    best, best_size = None, 0
    for name, child in part.named_modules():
        size = sum(p.numel() for p in child.parameters())
        if name and size > best_size and untraceable_op(child) is None:
            best, best_size = name, size
    return f'{path}.{best}' if best and path else best


def check_traceable(model: nn.Module, path: str) -> None:
    """Before any work: the part traces, or the error names the op and the largest part that does."""
    problem = untraceable_op(find_part(model, path))
    if problem is None:
        return
    instead = largest_traceable(model, path)
    raise UserError(f'model.quantize_part {path!r} does not trace: {problem}'
                    + (f'; the largest sub-module that traces is {instead!r}: set model.quantize_part to it'
                       if instead else ''))


def part_and_inputs(model: nn.Module, path: str, images: Optional[torch.Tensor], batch_size: int,
                    device: torch.device) -> Tuple[nn.Module, Optional[torch.Tensor]]:
    """The part (checked to trace) and what it receives for ``images`` inside ``model`` (None for None)."""
    check_traceable(model, path)
    inputs = capture_inputs(model, path, images, batch_size, device) if images is not None else None
    return find_part(model, path), inputs
