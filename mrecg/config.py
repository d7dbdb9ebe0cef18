"""Configuration: YAML (with ``_base_`` inheritance) -> defaults -> ``--set`` overrides -> one validation pass.

The schema below is the single list of every key, its type, default and allowed range. Unknown keys are
rejected with a did-you-mean, so a typo never silently falls back to a default. Algorithms never read
this dictionary: ``settings_from_config`` turns it into the typed, self-validating settings objects.
"""
import copy
import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml
from easydict import EasyDict

from mrecg.errors import ConfigError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One leaf of the schema: expected type(s), default, and an optional range check returning an error."""
    types: Tuple[type, ...]
    default: Any
    check: Optional[Callable[[Any], Optional[str]]] = None
    doc: str = ''


def positive(v):
    return None if v > 0 else 'must be > 0'


def non_negative(v):
    return None if v >= 0 else 'must be >= 0'


def one_of(*choices):
    return lambda v: None if v in choices else f'must be one of {", ".join(map(str, choices))}'


def bits(v):
    return None if isinstance(v, int) and 2 <= v <= 8 else 'must be an integer in 2..8'


def unit_fraction(v):
    return None if 0 <= v < 1 else 'must be in [0, 1)'


def drop_prob(v):
    return None if 0 < v <= 1 else 'must be in (0, 1] (1.0 = BRECQ, 0.5 = QDrop)'


def b_range(v):
    if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return 'must be two numbers [start, end]'
    return None if v[0] >= v[1] > 0 else 'must satisfy start >= end > 0'


def list_of_str_lists(v):
    if not all(isinstance(g, list) and g and all(isinstance(x, str) for x in g) for g in v):
        return 'must be a list of non-empty lists of module names'
    return None


def str_list(v):
    return None if all(isinstance(x, str) for x in v) else 'must be a list of strings'


NUM = (int, float)
OPT_STR = (str, type(None))
OPT_INT = (int, type(None))


def _qconfig(quantizer: str, observer: str, per_channel: bool) -> Dict[str, Key]:
    return {
        'quantizer': Key((str,), quantizer, one_of(quantizer)),
        'observer': Key((str,), observer, one_of('MinMaxObserver', 'EMAMinMaxObserver', 'MSEObserver',
                                                  'EMAMSEObserver', 'EMAQuantileObserver')),
        'bit': Key((int,), 4, bits),
        'symmetric': Key((bool,), False),
        'per_channel': Key((bool,), per_channel),
        'pot_scale': Key((bool,), False),
        'p': Key(NUM, 2.4, positive, 'Lp norm of the MSE observers\' range search'),
    }


SCHEMA: Dict[str, Any] = {
    'model': {
        'type': Key((str,), REQUIRED),
        'kwargs': Key((dict,), {}),
        'path': Key(OPT_STR, None, doc='checkpoint; required'),
        'units': Key((list, type(None)), None, lambda v: v is None or list_of_str_lists(v)),
    },
    'data': {
        'type': Key((str,), 'imagenet', one_of('imagenet', 'digits', 'fashion_mnist')),
        'path': Key(OPT_STR, None),
        'batch_size': Key((int,), 256, positive, 'batch of calibration and evaluation passes'),
        'num_workers': Key((int,), 4, non_negative),
        'pin_memory': Key((bool,), True),
        'input_size': Key((int,), 224, positive),
        'test_resize': Key((int,), 256, positive),
        'cali_transform': Key((str,), 'train', one_of('train', 'val')),
        'split_seed': Key((int,), 0),
        'eval_limit': Key(OPT_INT, None, lambda v: v is None or positive(v)),
    },
    'quantize': {
        'w_qconfig': _qconfig('AdaRoundFakeQuantize', 'MSEObserver', True),
        'a_qconfig': _qconfig('QDropFakeQuantize', 'EMAMSEObserver', False),
        'fold_bn': Key((bool,), True),
        'cali_size': Key((int,), 1024, positive, 'number of calibration images'),
        'reconstruction': {
            'enabled': Key((bool,), True, doc='false = nearest rounding after calibration'),
            'granularity': Key((str,), 'block', one_of('block', 'layer')),
            'iterations': Key((int,), 20000, positive),
            'batch_size': Key((int,), 32, positive, 'images per optimisation step'),
            'lr': Key(NUM, 1e-3, positive, 'Adam lr of the rounding variables'),
            'scale_lr': Key(NUM, 4e-5, non_negative, 'Adam lr of the activation steps (0 = frozen)'),
            'weight': Key(NUM, 0.01, non_negative, 'rounding regulariser weight'),
            'b_range': Key((list,), [20, 2], b_range),
            'warm_up': Key(NUM, 0.2, unit_fraction),
            'prob': Key(NUM, 0.5, drop_prob),
            'cache_device': Key((str,), 'auto', one_of('auto', 'cpu', 'device')),
            'cache_dtype': Key((str,), 'float32', one_of('float32', 'float16', 'bfloat16')),
        },
    },
    'mrecg': {
        'metric': Key((str,), 'none', one_of('none', 'modcap', 'loss')),
        'k': Key((int,), 0, non_negative, 'number of adjacent pairs to merge'),
        'lam': Key((int, float, type(None)), None, lambda v: v is None or non_negative(v)),
        'max_group_size': Key(OPT_INT, None, lambda v: v is None or (None if v >= 2 else 'must be >= 2')),
        'scheme': Key((list, str, type(None)), None),
        'stride_penalty': Key(NUM, 0.5, lambda v: None if 0 < v <= 1 else 'must be in (0, 1]'),
        'probe_iterations': Key(OPT_INT, None, lambda v: v is None or positive(v)),
    },
    'process': {
        'seed': Key((int,), 1005),
        'device': Key((str,), 'auto', one_of('auto', 'cpu', 'cuda')),
        'cache_dir': Key((str,), '.cache/mrecg', doc='loss-metric probes and (opt-in) calibrated quantizers'),
        'cache_calibration': Key((bool,), False, doc='reuse calibrated quantizer ranges across runs'),
    },
}


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def _read_yaml(path: str) -> Dict:
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark else ''
        raise ConfigError(f'{path}{where}: invalid YAML ({getattr(exc, "problem", exc)})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: the top level must be a mapping of sections (model, data, quantize, ...)')
    return data


def deep_merge(base: Dict, override: Dict) -> Dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ('kwargs',):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_with_bases(path: str, _seen: Sequence[str] = ()) -> Dict:
    """Read ``path``; ``_base_`` (a path or list, relative to the file) names files it extends."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f'{path}: _base_ chain loops back to itself')
    data = _read_yaml(path)
    bases = data.pop('_base_', [])
    merged: Dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, load_yaml_with_bases(os.path.join(os.path.dirname(path), base), (*_seen, path)))
    return deep_merge(merged, data)


def apply_overrides(data: Dict, overrides: Sequence[str]) -> Dict:
    """``--set a.b.c=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    data = copy.deepcopy(data)
    for item in overrides or ():
        if '=' not in item:
            raise ConfigError(f'--set expects key=value, got {item!r}')
        dotted, raw = item.split('=', 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = dotted.strip().split('.')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f'--set {dotted}: {part} is not a section')
        node[parts[-1]] = value
    return data


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f' (did you mean {close[0]!r}?)' if close else f' (known: {", ".join(sorted(options))})'


def _type_name(types: Tuple[type, ...]) -> str:
    names = {int: 'integer', float: 'number', bool: 'true/false', str: 'string', list: 'list', dict: 'mapping',
             type(None): 'null'}
    return ' or '.join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _resolve(schema: Dict, data: Any, path: str) -> Dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path or "config"} must be a mapping, got {type(data).__name__}')
    for key in data:
        if key not in schema:
            where = f'{path}.{key}' if path else key
            raise ConfigError(f'unknown config key {where!r}{_did_you_mean(key, schema)}')
    out = {}
    for key, spec in schema.items():
        where = f'{path}.{key}' if path else key
        if isinstance(spec, dict):
            out[key] = _resolve(spec, data.get(key), where)
            continue
        if key not in data:
            if spec.default is REQUIRED:
                raise ConfigError(f'missing required config key {where!r}')
            out[key] = copy.deepcopy(spec.default)
            continue
        value = data[key]
        ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
        if isinstance(value, int) and not isinstance(value, bool) and float in spec.types:
            ok = True
        if not ok:
            raise ConfigError(f'{where} must be {_type_name(spec.types)}, got {value!r}')
        if spec.check is not None and value is not None:
            problem = spec.check(value)
            if problem:
                raise ConfigError(f'{where} {problem}, got {value!r}')
        out[key] = value
    return out


def resolve_config(data: Dict) -> EasyDict:
    """Fill defaults and validate types/ranges of a raw config mapping (no filesystem checks here)."""
    cfg = EasyDict(_resolve(SCHEMA, data, ''))
    scheme = cfg.mrecg.scheme
    if isinstance(scheme, str) and scheme != 'authors':
        raise ConfigError("mrecg.scheme must be a list of groups of module names, e.g. [[layer1.1, layer2.0]], "
                          f"or 'authors' for the published grouping (strings are never evaluated), got {scheme!r}")
    if isinstance(scheme, list) and list_of_str_lists(scheme):
        raise ConfigError(f'mrecg.scheme {list_of_str_lists(scheme)}, got {scheme!r}')
    if scheme and (cfg.mrecg.metric != 'none' or cfg.mrecg.k):
        raise ConfigError('mrecg.scheme gives the groups explicitly: set mrecg.metric to none and mrecg.k to 0')
    if cfg.mrecg.metric != 'none' and cfg.mrecg.k == 0:
        raise ConfigError(f'mrecg.metric is {cfg.mrecg.metric} but mrecg.k is 0: set k >= 1 '
                          'or mrecg.metric: none for plain reconstruction')
    if cfg.mrecg.metric == 'none' and cfg.mrecg.k:
        raise ConfigError('mrecg.k is set but mrecg.metric is none: choose modcap or loss')
    if (cfg.mrecg.metric != 'none' or scheme) and cfg.quantize.reconstruction.granularity != 'block':
        raise ConfigError('MRECG groups block units: set quantize.reconstruction.granularity to block')
    if (cfg.mrecg.metric != 'none' or scheme) and not cfg.quantize.reconstruction.enabled:
        raise ConfigError('MRECG needs reconstruction: set quantize.reconstruction.enabled to true')
    if cfg.data.type == 'imagenet' and cfg.data.test_resize < cfg.data.input_size:
        raise ConfigError(f'data.test_resize ({cfg.data.test_resize}) must be >= data.input_size '
                          f'({cfg.data.input_size})')
    return cfg


def load_config(path: str, overrides: Sequence[str] = ()) -> EasyDict:
    return resolve_config(apply_overrides(load_yaml_with_bases(path), overrides))


def resolve_path(path: Optional[str]) -> Optional[str]:
    """Relative paths are taken from the current directory, else from the project root (so configs that
    name ``models/checkpoints/...`` work from anywhere)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def method_name(cfg: EasyDict) -> str:
    """The label of a run: nearest | adaround | brecq | qdrop, prefixed by ``mrecg+`` when grouping."""
    rec = cfg.quantize.reconstruction
    if not rec.enabled:
        return 'nearest'
    base = 'adaround' if rec.granularity == 'layer' else ('brecq' if rec.prob >= 1.0 else 'qdrop')
    return f'mrecg+{base}' if (cfg.mrecg.metric != 'none' or cfg.mrecg.scheme) else base


def to_plain(obj: Any) -> Any:
    """EasyDict -> plain dicts/lists for YAML/JSON dumps."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def dump_config(cfg: EasyDict) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def scheme_groups(cfg: EasyDict) -> Optional[List[List[str]]]:
    return [list(g) for g in cfg.mrecg.scheme] if isinstance(cfg.mrecg.scheme, list) else None


# ---------------------------------------------------------------------------------------------------
# typed settings for the algorithms
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, as validated objects; built once from the config by ``build_settings``."""
    model_type: str
    model_kwargs: Dict[str, Any]
    model_path: Optional[str]
    units_override: Optional[List[List[str]]]
    data: Any            # mrecg.data.DataSettings
    quant: Any           # mrecg.quantization.QuantSettings
    cali_size: int
    reconstruct: bool
    granularity: str
    recon: Any           # mrecg.reconstruction.ReconSettings
    grouping: Any        # mrecg.grouping.GroupingSettings
    scheme: Optional[Any]  # list of groups of names, 'authors', or None
    probe_iterations: int
    cache_dir: str
    cache_calibration: bool
    seed: int
    method: str


def build_settings(cfg: EasyDict) -> RunSettings:
    """Turn a resolved config into settings objects; any ValueError they raise becomes a ConfigError."""
    from models import model_entry, model_kwargs_error
    from mrecg.data import DataSettings
    from mrecg.grouping import GroupingSettings
    from mrecg.quantization import QuantizerSpec, QuantSettings
    from mrecg.reconstruction import ReconSettings

    try:
        model_entry(cfg.model.type)
    except ValueError as exc:
        raise ConfigError(f'model.type: {exc}') from None
    problem = model_kwargs_error(cfg.model.type, cfg.model.kwargs)
    if problem:
        raise ConfigError(f'model.kwargs: {problem}')
    rec, m = cfg.quantize.reconstruction, cfg.mrecg
    section = 'quantize'
    try:
        def spec(q):
            return QuantizerSpec(bit=q.bit, quantizer=q.quantizer, observer=q.observer, symmetric=q.symmetric,
                                 per_channel=q.per_channel, pot_scale=q.pot_scale, p=float(q.p))
        quant = QuantSettings(weight=spec(cfg.quantize.w_qconfig), act=spec(cfg.quantize.a_qconfig),
                              fold_bn=cfg.quantize.fold_bn)
        section = 'quantize.reconstruction'
        recon = ReconSettings(
            iterations=rec.iterations if rec.enabled else 0, batch_size=rec.batch_size, lr=float(rec.lr),
            scale_lr=float(rec.scale_lr), weight=float(rec.weight), b_range=tuple(float(b) for b in rec.b_range),
            warm_up=float(rec.warm_up), prob=float(rec.prob), cache_device=rec.cache_device,
            cache_dtype=rec.cache_dtype, chunk_size=cfg.data.batch_size)
        section = 'mrecg'
        grouping = GroupingSettings(metric=m.metric, k=m.k, lam=None if m.lam is None else float(m.lam),
                                    max_group_size=m.max_group_size, stride_penalty=float(m.stride_penalty))
    except ValueError as exc:
        raise ConfigError(f'{section}: {exc}') from None
    if isinstance(m.scheme, str) and m.scheme != 'authors':
        raise ConfigError("mrecg.scheme must be a list of groups of module names or 'authors'")
    data = DataSettings(type=cfg.data.type, path=resolve_path(cfg.data.path), batch_size=cfg.data.batch_size,
                        num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory,
                        input_size=cfg.data.input_size, test_resize=cfg.data.test_resize,
                        cali_transform=cfg.data.cali_transform, split_seed=cfg.data.split_seed,
                        eval_limit=cfg.data.eval_limit)
    return RunSettings(
        model_type=cfg.model.type, model_kwargs=dict(cfg.model.kwargs), model_path=resolve_path(cfg.model.path),
        units_override=[list(u) for u in cfg.model.units] if cfg.model.units else None, data=data, quant=quant,
        cali_size=cfg.quantize.cali_size, reconstruct=rec.enabled, granularity=rec.granularity, recon=recon,
        grouping=grouping, scheme=m.scheme if isinstance(m.scheme, str) else scheme_groups(cfg),
        probe_iterations=m.probe_iterations or rec.iterations, cache_dir=cfg.process.cache_dir,
        cache_calibration=cfg.process.cache_calibration, seed=cfg.process.seed,
        method=method_name(cfg))
