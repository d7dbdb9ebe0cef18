"""The run configuration: one typed object, the single source of every key, default, type and check.

Each section is a dataclass; a field's type annotation is its allowed type (``Literal`` for choices), its
``metadata`` holds an optional range check and a one-line doc. YAML files, ``--set`` overrides and Python
code all build the same ``Config``: ``Config.from_dict(mapping)`` (unknown keys get a did-you-mean) or the
dataclasses directly (``Config(model=ModelConfig(type='resnet18'))``), which validate themselves on
construction. ``config.to_dict()`` is what ``config.yaml`` in an output folder holds. Algorithms receive the
sections as typed objects; none of them reads YAML.
"""
import copy
import difflib
import os
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

import yaml

from mrecg.errors import ConfigError
from mrecg.yamlfile import YamlLimit, dump_yaml, parse_yaml, read_yaml  # noqa: F401 - parse_yaml re-exported

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN_DATA = ('imagenet', 'imagefolder', 'digits', 'fashion_mnist', 'fashion_segmentation', 'voc',
                'fashion_detection', 'coco')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- checks (return a problem or None) -------------------------------------------------------------------
def positive(v):
    """> 0"""
    return None if v > 0 else 'must be > 0'


def non_negative(v):
    """>= 0"""
    return None if v >= 0 else 'must be >= 0'


def bits(v):
    """2..8"""
    return None if 2 <= v <= 8 else 'must be an integer in 2..8'


def unit_fraction(v):
    """[0, 1)"""
    return None if 0 <= v < 1 else 'must be in [0, 1)'


def drop_prob(v):
    """(0, 1]"""
    return None if 0 < v <= 1 else 'must be in (0, 1] (1.0 = BRECQ, 0.5 = QDrop)'


def b_range(v):
    """[start, end], start >= end > 0"""
    if len(v) != 2:
        return 'must be two numbers [start, end]'
    return None if v[0] >= v[1] > 0 else 'must satisfy start >= end > 0'


def non_empty_groups(v):
    """non-empty lists"""
    return None if all(g for g in v) else 'must be a list of non-empty lists of module names'


def data_source(v):
    """a built-in name or an import path"""
    if v in BUILTIN_DATA or ':' in v:
        return None
    return (f'must be one of {", ".join(BUILTIN_DATA)} or a factory as package.module:make or '
            'path/to/file.py:make')


def module_path(v):
    """a dotted module path"""
    ok = all(p.isidentifier() or p.isdigit() for p in v.split('.'))
    return None if ok else 'must be a dotted module path like backbone or backbone.body'


METRICS = ('top1', 'miou', 'map')


def metric_name(v):
    """top1, miou, map or a user function"""
    from mrecg.imports import is_import_path
    if v in METRICS or is_import_path(v):
        return None
    return 'must be top1, miou, map or a function path/to/file.py:fn (fn(model, data, device) -> dict)'


def three_numbers(v):
    """1 or 3 numbers"""
    return None if len(v) in (1, 3) else 'must list 1 or 3 numbers (one per channel)'


def non_negative_or_auto(v):
    """>= 0 or auto"""
    return None if v == 'auto' or v >= 0 else 'must be >= 0 or auto'


def seed_range(v):
    """0..2^63-1"""
    return None if 0 <= v < 2 ** 63 else 'must be in 0..2^63-1 (a 64-bit seed)'


INT64 = 2 ** 63  # every integer a run uses ends up in a torch/numpy int64


def at_least_two(v):
    """>= 2"""
    return None if v >= 2 else 'must be >= 2'


def penalty(v):
    """(0, 1]"""
    return None if 0 < v <= 1 else 'must be in (0, 1]'


def key(default: Any = None, check: Optional[Callable] = None, doc: str = ''):
    """A config key: its default (copied per instance when mutable), optional check and doc."""
    meta = {'check': check, 'doc': doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- type checking from annotations ----------------------------------------------------------------------
def accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type (ints pass as floats, bools never as numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(accepts(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, List):
        return isinstance(value, list) and (not args or all(accepts(v, args[0]) for v in value))
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return ' or '.join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return 'one of ' + ', '.join(map(str, args))
    if origin in (list, List):
        return 'list' + (f' of {describe(args[0])}' if args and args[0] is not Any else '')
    if origin in (dict, Dict):
        return 'mapping'
    names = {int: 'integer', float: 'number', bool: 'true/false', str: 'string', dict: 'mapping',
             type(None): 'null'}
    if is_dataclass(hint):
        return 'a mapping'
    return names.get(hint, getattr(hint, '__name__', str(hint)))


def section_hint(hint: Any):
    """The dataclass a field holds (directly, optionally, or as list items), else None."""
    for a in (hint, *typing.get_args(hint)):
        if is_dataclass(a):
            return a
        for b in typing.get_args(a):
            if is_dataclass(b):
                return b
    return None


class Section:
    """Validation shared by every section: types from the annotations, then each key's check, then
    ``check_section`` for rules across keys. Errors name the key; ``from_dict`` adds the section's path."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            sub = section_hint(hint)
            if sub is not None and isinstance(value, dict):
                value = build_section(sub, value, f.name)
                setattr(self, f.name, value)
            elif sub is not None and isinstance(value, list) and typing.get_origin(hint) in (list, List):
                value = [build_section(sub, v, f'{f.name}[{i}]') if isinstance(v, dict) else v
                         for i, v in enumerate(value)]
                setattr(self, f.name, value)
            if not accepts(value, hint):
                raise ConfigError(f'must be {describe(hint)}, got {value!r}', f.name)
            check = f.metadata.get('check')
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise ConfigError(f'{problem}, got {value!r}', f.name)
            if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
                raise ConfigError(f'must fit in 64 bits (|value| < 2^63), got {value}', f.name)
        self.check_section()

    def check_section(self) -> None:
        """Rules that involve several keys of the section (override in a section)."""

    def to_dict(self) -> Dict[str, Any]:
        return to_plain(asdict(self))


def build_section(cls, data: Any, path: str = ''):
    """A section from a mapping: unknown keys are errors with a did-you-mean; errors carry the full path."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f'must be a mapping, got {type(data).__name__}', path or 'config')
    names = [f.name for f in fields(cls)]
    for k in data:
        if k not in names:
            where = f'{path}.{k}' if path else str(k)
            raise ConfigError("unknown config key '{key}'" + did_you_mean(str(k), names), where)
    try:
        return cls(**data)
    except ConfigError as exc:
        raise exc.under(path) from None


def did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f' (did you mean {close[0]!r}?)' if close else f' (known: {", ".join(sorted(options))})'


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and mappings -> plain dicts and lists, for YAML and JSON."""
    if is_dataclass(obj):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# ---- the sections ----------------------------------------------------------------------------------------
Observer = Literal['MinMaxObserver', 'EMAMinMaxObserver', 'MSEObserver', 'EMAMSEObserver', 'EMAQuantileObserver']


@dataclass
class ModelConfig(Section):
    type: Optional[str] = key(None, doc='registry name, torchvision:<name>, timm:<name>, package.module:Name '
                                        'or path/to/file.py:Name')
    kwargs: Dict[str, Any] = key({}, doc='arguments of the model builder')
    path: Optional[str] = key(None, doc='float checkpoint, loaded by parameter name (weights_only)')
    units: Optional[List[List[str]]] = key(None, non_empty_groups, 'explicit base units (lists of module names)')
    quantize_part: Optional[str] = key(None, module_path, 'quantize only this sub-module (e.g. backbone); the rest '
                                                          'stays float, evaluation runs the whole network')


@dataclass
class DataConfig(Section):
    type: str = key('imagenet', data_source, 'imagenet, imagefolder, digits, fashion_mnist, fashion_segmentation, '
                                             'voc, fashion_detection, coco or a factory')
    path: Optional[str] = key(None, doc='dataset folder (train/ and val/ for imagenet and imagefolder)')
    kwargs: Dict[str, Any] = key({}, doc='arguments of a data factory: make(split, **kwargs)')
    batch_size: int = key(256, positive, 'batch of calibration and evaluation passes')
    num_workers: int = key(4, non_negative, 'DataLoader workers of the calibration draw and the evaluation')
    pin_memory: bool = key(True, doc='pinned host memory for the evaluation batches on a GPU')
    input_size: int = key(224, positive, 'crop size (imagenet, imagefolder)')
    test_resize: int = key(256, positive, 'short side before the centre crop (imagenet, imagefolder)')
    mean: List[float] = key(list(IMAGENET_MEAN), three_numbers, 'normalisation (imagenet, imagefolder)')
    std: List[float] = key(list(IMAGENET_STD), three_numbers, 'normalisation (imagenet, imagefolder)')
    cali_transform: Literal['train', 'val'] = key('train', doc='train = RandomResizedCrop + flip (seeded)')
    split_seed: int = key(0, seed_range, doc="seed of the digits train/test split and of data.eval_limit's sample")
    eval_limit: Optional[int] = key(None, positive, 'evaluate on at most this many images (a sample across the '
                                                    'classes, seeded by split_seed)')
    evaluate: bool = key(True, doc='false: no accuracy (no labelled data needed)')

    def check_section(self):
        if any(s <= 0 for s in self.std):
            raise ConfigError(f'must be > 0, got {self.std!r}', 'std')
        if self.type in ('imagenet', 'imagefolder') and self.test_resize < self.input_size:
            raise ConfigError(f'({self.test_resize}) must be >= data.input_size ({self.input_size})', 'test_resize')


@dataclass
class WeightQuantConfig(Section):
    quantizer: Literal['AdaRoundFakeQuantize'] = key('AdaRoundFakeQuantize', doc="MQBench's fake quantizer "
                                                     '(AdaRound: learned rounding)')
    observer: Observer = key('MSEObserver', doc="MQBench's range observer used at calibration")
    bit: int = key(4, bits, 'bit-width of every conv/linear weight (the first and last layer: 8)')
    symmetric: bool = key(False, doc='signed symmetric grid (the ONNX export writes unsigned only)')
    per_channel: bool = key(True, doc='one scale per output channel')
    pot_scale: bool = key(False, doc='scales rounded to powers of two')
    p: float = key(2.4, positive, "Lp norm of the MSE observers' range search")

    def qscheme(self) -> Dict[str, Any]:
        scheme = dict(bit=self.bit, symmetry=self.symmetric, per_channel=self.per_channel, pot_scale=self.pot_scale)
        if self.observer in ('MSEObserver', 'EMAMSEObserver'):
            scheme['p'] = float(self.p)
        return scheme


@dataclass
class ActQuantConfig(WeightQuantConfig):
    quantizer: Literal['QDropFakeQuantize'] = key('QDropFakeQuantize', doc="MQBench's fake quantizer (QDrop: "
                                                  'learnable step, random drop during reconstruction)')
    observer: Observer = key('EMAMSEObserver', doc="MQBench's range observer used at calibration")
    bit: int = key(4, bits, 'bit-width of every conv/linear input (the first and last layer: 8)')
    per_channel: bool = key(False, doc='must stay false: activations are quantized per tensor')
    ste_bounds: Literal['strict', 'inclusive'] = key('strict', doc="reconstruction's straight-through mask: strict "
                                                                   '(torch 2 clamp) or inclusive of qmin/qmax '
                                                                   '(torch 1, the published numbers)')

    def check_section(self):
        if self.per_channel:  # would fail only at the first unit, hours in: the step and the export are per tensor
            raise ConfigError('must be false: activations are quantized per tensor (the reconstruction step and the '
                              'ONNX export have no per-channel activation quantizer)', 'per_channel')


@dataclass
class LayerBits(Section):
    """Bits for the conv/linear layers whose names match ``modules`` (names or glob patterns); ``a_bit`` is
    the bit-width of the layer's input quantizer (MQBench quantizes the input of every conv/linear)."""
    modules: List[str] = key([], lambda v: None if v else 'must name at least one module or pattern',
                             'conv/linear names or glob patterns (a pattern matching nothing is an error)')
    w_bit: Optional[int] = key(None, bits, "the layers' weight bits")
    a_bit: Optional[int] = key(None, bits, "the bits of the layers' input quantizers (shared ones take the "
                                           'highest asked for)')

    def check_section(self):
        if self.w_bit is None and self.a_bit is None:
            raise ConfigError(f'the entry for {self.modules} sets neither w_bit nor a_bit')


@dataclass
class ReconstructionConfig(Section):
    enabled: bool = key(True, doc='false = nearest rounding after calibration')
    granularity: Literal['block', 'layer'] = key('block', doc='block = BRECQ/QDrop units, layer = AdaRound '
                                                             '(each conv/linear alone)')
    iterations: int = key(20000, positive, 'optimisation steps per unit')
    batch_size: int = key(32, positive, 'images per optimisation step')
    lr: float = key(1e-3, positive, 'Adam lr of the rounding variables')
    scale_lr: float = key(4e-5, non_negative, 'Adam lr of the activation steps (0 = frozen)')
    weight: float = key(0.01, non_negative, 'rounding regulariser weight')
    b_range: List[float] = key([20, 2], b_range, "the rounding regulariser's exponent, annealed from start to end")
    warm_up: float = key(0.2, unit_fraction, 'fraction of the iterations before the regulariser starts')
    prob: float = key(0.5, drop_prob, 'QDrop: probability of keeping an activation quantized (1.0 = BRECQ)')
    cache_device: Literal['auto', 'cpu', 'device'] = key('auto', doc='where the cached activations live (cpu: '
                                                                     'host memory feeding the GPU; auto: the GPU '
                                                                     'when their peak fits 80 % of its free memory, '
                                                                     'else host memory, said in the log)')
    cache_dtype: Literal['float32', 'float16', 'bfloat16'] = key('float32', doc='dtype of the cached activations '
                                                                                '(16-bit halves the memory)')
    head_ops: Literal['classifier', 'last_block'] = key('classifier', doc='pooling, flatten and the classifier\'s '
                                                        'input quantizer open the classifier unit, or end the last '
                                                        'block (MQBench)')
    autocast: Literal['none', 'bfloat16'] = key('none', doc="the step's convolutions in bfloat16 (quantizers, loss, "
                                                            'optimiser stay float32)')
    prefetch: Literal['auto', 'on', 'off'] = key('auto', doc="gather the next step's batch while this one computes "
                                                         '(auto: host caches feeding a GPU; same numbers)')
    kernels: Literal['auto', 'reference', 'cpu', 'cuda', 'compiled'] = key(
        'auto', doc="the step's kernel set (auto: cpu on the CPU; compiled on CUDA with Triton, else cuda); each draws "
                    "its own QDrop masks, so it is part of the resume digest")


def bit_list(v):
    """distinct bit-widths in 2..8"""
    if not v:
        return 'must list at least one bit-width'
    if len(set(v)) != len(v):
        return 'must not repeat a bit-width'
    return next((f'must hold bit-widths in 2..8 ({b} is not)' for b in v if not 2 <= b <= 8), None)


@dataclass
class BitCandidates(Section):
    """The bit-widths the search may give each layer it is allowed to change."""
    w: List[int] = key([2, 3, 4, 8], bit_list, "weight bits of every searched conv/linear")
    a: Optional[List[int]] = key(None, bit_list, 'input bits of every searched activation quantizer (null: '
                                                 'quantize.a_qconfig.bit everywhere, not searched)')


@dataclass
class BitBudget(Section):
    """Exactly one limit: the mean weight bits of the searched layers, the weights' size, or the compute."""
    avg_w_bits: Optional[float] = key(None, positive, 'parameter-weighted mean weight bits of the layers the '
                                                      'search may change')
    size_mb: Optional[float] = key(None, positive, 'weights of every conv/linear as stored, packed bits, '
                                                   'in 10^6 bytes')
    bops_g: Optional[float] = key(None, positive, 'giga bit-operations: sum of MACs x weight bits x input bits')

    def check_section(self):
        given = [name for name in ('avg_w_bits', 'size_mb', 'bops_g') if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError('must set exactly one of avg_w_bits, size_mb, bops_g'
                              + (f' (got {", ".join(given)})' if given else ''))

    @property
    def kind(self) -> str:
        return next(name for name in ('avg_w_bits', 'size_mb', 'bops_g') if getattr(self, name) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))


@dataclass
class BitSearchConfig(Section):
    """Mixed precision: each searchable layer's bits chosen from ``candidates`` to minimise the summed sensitivity
    under ``budget`` (an exact integer programme). Layers fixed by ``layer_bits`` or the first/last-layer rule
    are left as they are."""
    candidates: BitCandidates = key(None, doc='the bit-widths to choose from')
    budget: BitBudget = key(None, doc='one of avg_w_bits, size_mb, bops_g')
    measure: Literal['fisher', 'output', 'weight', 'random'] = key(
        'fisher', doc="each layer's sensitivity per bit-width: fisher = diagonal Fisher times the weight error "
                      "(data; the best predictor measured), output = the logits' squared change with that layer "
                      'alone quantized (data; also ranks activation bits), weight = the weight error alone '
                      '(data-free), random = a random importance per layer (a control)')
    samples: int = key(256, positive, 'calibration images the data measures use')

    def __post_init__(self):
        self.candidates = BitCandidates() if self.candidates is None else self.candidates
        if self.budget is None:
            raise ConfigError('is required: one of avg_w_bits, size_mb, bops_g', 'budget')
        super().__post_init__()
        if self.candidates.a and len(self.candidates.a) > 1 and self.measure in ('fisher', 'weight'):  # one: no search
            raise ConfigError(f'{self.measure} ranks weight bits only: to search over candidates.a '
                              f'{self.candidates.a} set measure: output (or random), or give one width', 'measure')


@dataclass
class QuantizeConfig(Section):
    w_qconfig: WeightQuantConfig = key(None, doc='the weight quantizers')
    a_qconfig: ActQuantConfig = key(None, doc='the activation (layer input) quantizers')
    layer_bits: List[LayerBits] = key([], doc='per-layer bit overrides: [{modules: [...], w_bit, a_bit}]')
    bit_search: Optional[BitSearchConfig] = key(None, doc='mixed precision under a budget (null: the bits above)')
    fold_bn: bool = key(True, doc='fold BatchNorm into the preceding conv before quantizing (BRECQ, QDrop)')
    cali_size: int = key(1024, positive, 'number of calibration images')
    reconstruction: ReconstructionConfig = key(None, doc='block reconstruction (AdaRound, BRECQ, QDrop)')

    def __post_init__(self):
        self.w_qconfig = WeightQuantConfig() if self.w_qconfig is None else self.w_qconfig
        self.a_qconfig = ActQuantConfig() if self.a_qconfig is None else self.a_qconfig
        self.reconstruction = ReconstructionConfig() if self.reconstruction is None else self.reconstruction
        super().__post_init__()

    def check_section(self):
        rec = self.reconstruction
        if rec.enabled and rec.batch_size > self.cali_size:  # every step would take the whole set, unsaid
            raise ConfigError(f'({rec.batch_size}) is larger than quantize.cali_size ({self.cali_size}): every step '
                              f'would use the same {self.cali_size} images; set it <= {self.cali_size} or raise '
                              'cali_size', 'reconstruction.batch_size')

    def mqbench_prepare_dict(self) -> Dict:
        w, a = self.w_qconfig, self.a_qconfig
        return {'extra_qconfig_dict': {
            'w_observer': w.observer, 'a_observer': a.observer, 'w_fakequantize': w.quantizer,
            'a_fakequantize': a.quantizer, 'w_qscheme': w.qscheme(), 'a_qscheme': a.qscheme()}}


DEFAULT_K = 3  # the measured safe setting merges three pairs
# MRECG's grouping options as the paper has them (the defaults below are the measured safe rule instead)
PAPER_RULE = {'difference': 'squared', 'pairs': 'all', 'exclude_classifier': False, 'group_iterations': 'one_unit'}


@dataclass
class MrecgConfig(Section):
    metric: Literal['none', 'modcap', 'loss'] = key('modcap', doc='what groups units: ModCap (data-free), the '
                                                                  "plain run's per-unit loss, or none (plain "
                                                                  'BRECQ/QDrop)')
    k: Union[int, Literal['auto'], None] = key(None, non_negative_or_auto,
                                               'number of adjacent pairs to merge; auto = one per fall of the metric; '
                                               f"null = {DEFAULT_K}, or all of a small model's eligible pairs if fewer")
    lam: Optional[float] = key(None, non_negative, 'lets the number of merged pairs drift from k: maximise sum(d m) '
                                                   '- lam (sum(m) - k)^2')
    max_group_size: Optional[int] = key(None, at_least_two, 'largest number of units in one group')
    scheme: Union[List[List[str]], str, None] = key(None, doc="groups of module names, or 'authors'")
    stride_penalty: float = key(0.5, penalty, "ModCap's factor for a layer with stride > 1")
    probe_iterations: Optional[int] = key(None, positive, 'iterations per unit of the loss metric\'s plain probe '
                                                          '(null: quantize.reconstruction.iterations)')
    difference: Literal['squared', 'relative', 'log'] = key('log', doc='pair score: (ln a - ln b)^2, (a-b)^2 (the '
                                                                     'paper), or relative to max(a, b)')
    pairs: Literal['all', 'falls'] = key('all', doc='falls: merge only pairs where the metric falls (a > b)')
    exclude_classifier: bool = key(True, doc='never merge the last unit (the classifier\'s; the paper: false)')
    group_iterations: Literal['one_unit', 'per_unit'] = key('per_unit', doc='a merged group of n units gets the '
                                                                            'iterations of n units, or of one '
                                                                            '(the paper)')

    def check_section(self):
        if isinstance(self.scheme, str) and self.scheme != 'authors':
            raise ConfigError("must be a list of groups of module names, e.g. [[layer1.1, layer2.0]], "
                              f"or 'authors' for the published grouping (strings are never evaluated), "
                              f"got {self.scheme!r}", 'scheme')
        if isinstance(self.scheme, list) and non_empty_groups(self.scheme):
            raise ConfigError(f'{non_empty_groups(self.scheme)}, got {self.scheme!r}', 'scheme')
        if self.scheme and (self.metric, self.k) == ('modcap', None):  # the defaults: the scheme decides
            self.metric = 'none'
        if self.scheme and (self.metric != 'none' or self.k):
            raise ConfigError('gives the groups explicitly: set mrecg.metric to none and mrecg.k to 0', 'scheme')
        if self.k == 'auto' and self.lam is not None:
            raise ConfigError('is auto, which sets the count itself: drop mrecg.lam (or give k a number)', 'k')
        if self.metric != 'none' and self.k == 0:
            raise ConfigError(f'is {self.metric} but mrecg.k is 0: set k >= 1 or mrecg.metric: none '
                              'for plain reconstruction', 'metric')

    def ignored(self) -> List[str]:
        """Keys that have no effect under this section's other keys (said in the log and results, not refused:
        ``--set mrecg.metric=none`` is how the baseline of an MRECG config is run)."""
        if self.metric != 'none' or self.scheme:
            return []
        return [f'mrecg.{name} ({getattr(self, name)}) is ignored: mrecg.metric is none (plain reconstruction)'
                for name in ('k', 'lam', 'max_group_size') if getattr(self, name) not in (None, 0)]

    @property
    def grouped(self) -> bool:
        return self.metric != 'none' or bool(self.scheme)


@dataclass
class ProcessConfig(Section):
    seed: int = key(1005, seed_range, doc='seeds calibration draws, QDrop masks, batches and workers: same seed, same numbers')
    device: Literal['auto', 'cpu', 'cuda'] = key('auto', doc='auto = CUDA when present')
    cache_dir: str = key('.cache/mrecg', doc='loss-metric probes and (opt-in) calibrated quantizers')
    cache_calibration: bool = key(False, doc='reuse calibrated quantizer ranges across runs')
    dist_timeout_s: float = key(1800.0, positive, 'data-parallel runs: longest wait for another process')
    deterministic: bool = key(False, doc='CUDA: cuDNN picks deterministic kernels and no autotuner (slower; '
                                         'the CPU is deterministic either way)')


def percent(v):
    """[0, 100]"""
    return None if 0 <= v <= 100 else 'must be a percentage in [0, 100]'


@dataclass
class EvalConfig(Section):
    """How the evaluation data is scored: the task's metric."""
    metric: str = key('top1', metric_name, 'top1 (classifier), miou (segmentation: mean IoU over the classes), '
                                           'map (detection: COCO mAP@[.5:.95], pycocotools), or '
                                           'path/to/file.py:fn called as fn(model, data, device) -> dict '
                                           '(its first entry is the score)')
    ignore_index: int = key(255, doc='miou: label-map value of pixels left out of the score (VOC: 255)')


@dataclass
class ExportConfig(Section):
    """The check of ``--export onnx``: onnxruntime and the fake-quant model sum convolutions in different orders,
    so single images may flip; a real mismatch moves many."""
    min_agreement: float = key(99.0, percent, "% of evaluation images whose top-1 class onnxruntime and the "
                                               'fake-quant model agree on, at least')
    max_top1_gap: float = key(0.1, non_negative, 'largest top-1 difference in points (or max_gap_images images, '
                                                 'whichever is more)')
    max_gap_images: int = key(2, non_negative, 'largest top-1 difference in images (small evaluation sets)')


@dataclass
class Config(Section):
    model: ModelConfig = key(None, doc='the float network and its checkpoint')
    data: DataConfig = key(None, doc='calibration and evaluation data')
    quantize: QuantizeConfig = key(None, doc='quantizers, bits and reconstruction')
    mrecg: MrecgConfig = key(None, doc="MRECG's grouping of adjacent units")
    process: ProcessConfig = key(None, doc='seed, device, caches')
    eval: EvalConfig = key(None, doc="the task's metric")
    export: ExportConfig = key(None, doc='the check of --export onnx')

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, typing.get_type_hints(Config)[f.name]())
        super().__post_init__()

    def check_section(self):
        rec, m = self.quantize.reconstruction, self.mrecg
        plain = rec.granularity != 'block' or not rec.enabled  # layer-wise AdaRound or nearest rounding
        if plain and (m.metric, m.k, m.scheme) == ('modcap', None, None):  # the default grouping: off for them
            m.metric = 'none'
        if m.grouped and rec.granularity != 'block':
            raise ConfigError('MRECG groups block units: set quantize.reconstruction.granularity to block, or '
                              'mrecg.metric to none for layer-wise AdaRound')
        if m.grouped and not rec.enabled:
            raise ConfigError('MRECG needs reconstruction: set quantize.reconstruction.enabled to true, or '
                              'mrecg.metric to none for nearest rounding')

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]]) -> 'Config':
        return build_section(cls, data or {}, '')

    @property
    def method(self) -> str:
        """The label of a run: nearest | adaround | brecq | qdrop, prefixed by ``mrecg+`` when grouping."""
        rec = self.quantize.reconstruction
        if not rec.enabled:
            return 'nearest'
        base = 'adaround' if rec.granularity == 'layer' else ('brecq' if rec.prob >= 1.0 else 'qdrop')
        return f'mrecg+{base}' if self.mrecg.grouped else base


# ---- files and overrides ---------------------------------------------------------------------------------
def deep_merge(base: Dict, override: Dict) -> Dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != 'kwargs':
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_with_bases(path: str, _seen: Sequence[str] = ()) -> Dict:
    """Read ``path``; ``_base_`` (a path or list, relative to the file) names files it extends."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f'{path}: _base_ chain loops back to itself')
    data = read_yaml(path)
    bases = data.pop('_base_', [])
    merged: Dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, load_yaml_with_bases(os.path.join(os.path.dirname(path), base), (*_seen, path)))
    return deep_merge(merged, data)


def apply_overrides(data: Dict, overrides: Sequence[str]) -> Dict:
    """``--set a.b.c=value``; the value is parsed as YAML (numbers, booleans, lists; no tags)."""
    data = copy.deepcopy(data)
    for item in overrides or ():
        if '=' not in item:
            raise ConfigError(f'--set expects key=value, got {item!r}')
        dotted, raw = item.split('=', 1)
        try:
            value = parse_yaml(raw)
        except YamlLimit as exc:
            raise ConfigError(f'--set {dotted}: {exc}') from None
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


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """YAML file (with ``_base_``) + ``--set`` overrides -> validated ``Config``."""
    return Config.from_dict(apply_overrides(load_yaml_with_bases(path), overrides))


def as_config(config: Union[Config, Dict[str, Any], str, None]) -> Config:
    """What the Python API accepts as a config: a Config, a mapping like the YAML, or a YAML path."""
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        return load_config(config)
    if config is None or isinstance(config, dict):
        return Config.from_dict(config or {})
    raise ConfigError(f'config must be a mrecg.Config, a mapping or a YAML path, got {type(config).__name__}')


def dump_config(cfg: Config) -> str:
    return dump_yaml(cfg.to_dict())


def resolve_path(path: Optional[str]) -> Optional[str]:
    """Relative paths are taken from the current directory, else from the project root (so configs that
    name ``models/checkpoints/...`` work from anywhere)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.exists(candidate) else path
