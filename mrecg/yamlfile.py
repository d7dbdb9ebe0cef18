"""YAML as this toolkit reads it: safe, YAML 1.2 scalars, and bounded, so a hostile file fails in one line.

PyYAML's ``SafeLoader`` runs no tags, but it expands aliases by reference (a "billion laughs" of nine nested
aliases is a few hundred bytes that become 9^9 nodes the moment anything walks the result), recurses once per
nesting level (10 000 levels end in a ``RecursionError``) and keeps the last of two equal keys (a second
``quantize:`` silently drops the first). ``BoundedLoader`` counts every node an alias would expand to before
anything is built, limits the depth and refuses duplicate keys, each with the line; ``parse_yaml`` and
``read_yaml`` are the only ways the toolkit reads YAML (config files and ``--set`` values alike).
"""
import os
import re
from typing import Any, Dict

import yaml

from mrecg.errors import ConfigError

MAX_NODES = 100_000  # nodes after alias expansion: the largest config in configs/ has ~300
MAX_DEPTH = 64  # nesting levels: configs use 4
MAX_BYTES = 1 << 20  # a config file larger than this is not a config


class YamlLimit(ConfigError):
    """A YAML document over a bound, or with a duplicate key: refused before it is built."""


def _where(node) -> str:
    return f'line {node.start_mark.line + 1}'


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags execute) with the scalars of YAML 1.2's core schema, which is what a
    reader expects: ``1e-3`` is a number (YAML 1.1: a string), ``010`` is ten (1.1: octal eight), ``on``,
    ``off``, ``yes`` and ``no`` are strings (1.1: booleans)."""


class BoundedLoader(Yaml12Loader):
    """``Yaml12Loader`` that refuses, before construction, documents over ``MAX_NODES`` (aliases counted as
    what they expand to), deeper than ``MAX_DEPTH``, or with a key twice in one mapping."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._weight: Dict[int, int] = {}  # id(node) -> nodes it expands to (aliases share their anchor's)

    def compose_node(self, parent, index):
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlLimit(f'nested deeper than {MAX_DEPTH} levels at {_where(self.peek_event())}')
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._weigh(node)
        return node

    def _weigh(self, node) -> None:
        if id(node) in self._weight:  # an alias: the anchored node again, counted once more below by its parent
            return
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        weight = 1 + sum(self._weight.get(id(c), 1) for c in children)
        if weight > MAX_NODES:
            raise YamlLimit(f'expands to more than {MAX_NODES:,} values at {_where(node)} (aliases counted as '
                            'what they repeat): not a config')
        self._weight[id(node)] = weight

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in seen and key != '<<':
                    raise YamlLimit(f'key {key!r} appears twice in one mapping (lines {seen[key]} and '
                                    f'{key_node.start_mark.line + 1}): the first would be silently dropped')
                seen.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


class Yaml12Dumper(yaml.SafeDumper):
    """The dumper whose quoting matches ``Yaml12Loader``: ``config.yaml`` reads back as it was written."""


YAML12_SCALARS = [
    ('tag:yaml.org,2002:bool', r'^(?:true|True|TRUE|false|False|FALSE)$', 'tTfF'),
    ('tag:yaml.org,2002:int', r'^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$', '-+0123456789'),
    ('tag:yaml.org,2002:float', r'^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?'
                                r'|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$', '-+0123456789.'),
]


def _core_schema(cls) -> None:
    """Replace the YAML 1.1 bool/int/float/timestamp resolvers of ``cls`` by the core schema's."""
    replaced = {tag for tag, _, _ in YAML12_SCALARS} | {'tag:yaml.org,2002:timestamp'}  # dates stay strings
    cls.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in replaced]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for tag, pattern, first in YAML12_SCALARS:
        cls.add_implicit_resolver(tag, re.compile(pattern), list(first))


def _core_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    return int(text[2:], 8) if text.startswith('0o') else int(text, 16) if text.startswith('0x') else int(text, 10)


_core_schema(Yaml12Loader)
_core_schema(Yaml12Dumper)
Yaml12Loader.add_constructor('tag:yaml.org,2002:int', _core_int)


def parse_yaml(text: Any) -> Any:
    """One YAML document (text or a stream), bounded; raises ``YamlLimit`` or ``yaml.YAMLError``."""
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass: no tags execute


def read_yaml(path: str) -> Dict:
    """A config file as a mapping; every problem is one ``ConfigError`` naming the file and the line."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        if os.path.getsize(path) > MAX_BYTES:
            raise ConfigError(f'{path}: {os.path.getsize(path):,} bytes is not a config (at most {MAX_BYTES:,})')
        with open(path, encoding='utf-8') as f:
            data = parse_yaml(f)
    except YamlLimit as exc:
        raise ConfigError(f'{path}: {exc}') from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark else ''
        raise ConfigError(f'{path}{where}: invalid YAML ({getattr(exc, "problem", exc)})') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f'cannot read config {path}: {exc}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: the top level must be a mapping of sections (model, data, quantize, ...)')
    return data


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=Yaml12Dumper, sort_keys=False)
