"""Objects named by the user as ``package.module:Name`` or ``path/to/file.py:Name`` (models, data factories).

A file path is loaded as a module of its own (its folder need not be a package, and a file called
``models.py`` does not collide with anything of ours). A dotted module is imported normally, with the
current folder importable as a script run there would have it. Every failure is one ``UserError`` line.
"""
import importlib
import importlib.util
import os
import sys
from typing import Any

from mrecg.errors import UserError


def is_import_path(spec: str) -> bool:
    return ':' in spec and not spec.startswith(('torchvision:', 'timm:'))


def import_object(spec: str, what: str) -> Any:
    """The object ``spec`` names; ``what`` (e.g. 'model.type') is how errors refer to the key."""
    target, _, name = spec.rpartition(':')
    if not target or not name:
        raise UserError(f'{what} {spec!r} must look like package.module:Name or path/to/file.py:Name')
    module = _load_file(target, what) if target.endswith('.py') or os.sep in target else _load_module(target, what)
    obj = module
    for part in name.split('.'):
        if not hasattr(obj, part):
            raise UserError(f'{what}: {target} has no attribute {part!r}')
        obj = getattr(obj, part)
    return obj


def _load_file(path: str, what: str):
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise UserError(f'{what}: file not found: {path}')
    module_name = f'mrecg_user_{abs(hash(full)):x}'
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed to import: say where, in one line
        del sys.modules[module_name]
        raise UserError(f'{what}: importing {path} raised {type(exc).__name__}: {first_line(exc)}') from None
    return module


def _load_module(dotted: str, what: str):
    cwd = os.getcwd()
    if cwd not in sys.path and '' not in sys.path:
        sys.path.append(cwd)  # as `python -m` would: a package in the current folder is importable
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name and dotted.startswith(exc.name.split('.')[0]):
            raise UserError(f'{what}: no module named {exc.name!r} (is it installed, or in the current folder?)') \
                from None
        raise UserError(f'{what}: importing {dotted} raised ModuleNotFoundError: {first_line(exc)}') from None
    except Exception as exc:
        raise UserError(f'{what}: importing {dotted} raised {type(exc).__name__}: {first_line(exc)}') from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
