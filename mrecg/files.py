"""Files the toolkit reads back (checkpoints, quantized models, caches, results): untrusted, so each is read
with ``weights_only`` (no pickled code runs) and a cut-off, corrupt or hostile file is one ``BadFile`` line
that names it, never a traceback. Callers decide what a bad file means: a cache entry is a miss, an output a
refusal."""
import json
from typing import Any

import torch

from mrecg.errors import UserError
from mrecg.imports import first_line


class BadFile(UserError):
    """A file that exists but cannot be used: truncated, corrupt, or needing code to load."""


def read_torch(path: str, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``what`` names the file in the message."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # zip errors, unpickling refusals, EOF: all mean the file is unusable
        reason = 'it would run code to load (only tensors are accepted)' if 'weights_only' in str(exc).lower() \
            or 'unpickl' in type(exc).__name__.lower() else first_line(exc).split('. ')[0]  # torch adds advice
        raise BadFile(f'cannot read {what} {path}: {reason}') from None


def read_json(path: str, what: str) -> Any:
    """A JSON file; a cut-off or non-JSON file is one ``BadFile`` line with its position."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise BadFile(f'cannot read {what} {path}: not complete JSON ({exc.msg} at line {exc.lineno}, column '
                      f'{exc.colno}); was the run cut off while writing it?') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFile(f'cannot read {what} {path}: {first_line(exc)}') from None
