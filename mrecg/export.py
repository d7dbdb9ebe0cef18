"""A deployable result: the quantized model as ONNX with real low-bit weights, checked in onnxruntime.

Why our own exporter and not MQBench's deploy path: MQBench's ``convert_deploy`` targets its hardware
backends (TensorRT, SNPE, ...) and the academic backend has none; its ONNX QDQ path writes 8-bit
containers with the range in side files, and ``torch.onnx`` writes no 4-bit initializers. So the graph is
written here node by node from the quantized ``torch.fx`` graph with ``onnx.helper`` (opset 21):

- conv/linear weights as ``uint4`` (2 to 4 bits) or ``uint8`` (the 8-bit first and last layers)
  initializers with per-channel scale and zero point, each followed by ``DequantizeLinear(axis=0)``;
- every activation quantizer as ``QuantizeLinear``/``DequantizeLinear`` (uint8 container) with the learned
  step and zero point, then a ``Clip`` to the quantizer's exact range when it has fewer than 8 bits (a
  container's saturation alone would let a 2- or 3-bit activation take 4- or 8-bit values);
- BN (when not folded), ReLU/ReLU6 and the usual activations, pooling, adds, products, concatenation,
  flatten, mean as their ONNX operators.

Anything else is an ``ExportError`` naming the node: never a silently different graph.
"""
import operator
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from mrecg.errors import UserError
from mrecg.quantization import is_act_quantizer, quantizer_bits

OPSET = 21
MISMATCHES = 'export_mismatches.json'  # beside the model: the evaluation images whose top-1 classes differ


class ExportError(UserError):
    """The model holds an operation the exporter cannot express exactly, or the export does not match."""


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and what onnxruntime measured on it (``results.json``'s ``export``)."""
    path: str
    float_path: str
    opset: int
    file_bytes: int
    float_file_bytes: int
    weight_types: Dict[str, int] = field(default_factory=dict)  # initializer type -> number of layers
    onnxruntime_top1: Optional[float] = None
    fake_quant_top1: Optional[float] = None
    agreement: Optional[float] = None  # % of images whose onnxruntime and fake-quant argmax agree
    max_logit_diff: Optional[float] = None
    eval_images: int = 0
    latency_ms: Dict[str, float] = field(default_factory=dict)  # batch-1 median, quantized and float
    onnxruntime: str = ''
    top1_gap: Optional[float] = None  # |onnxruntime top-1 - fake-quant top-1|, points
    disagreements: List[int] = field(default_factory=list)  # positions in the evaluation order
    check: Dict[str, Any] = field(default_factory=dict)  # the rule, its allowed gap and the verdict

    def to_dict(self) -> Dict[str, Any]:
        """For ``results.json``: the images that differ are counted here and listed in ``MISMATCHES``."""
        out = asdict(self)
        out['disagreeing_images'] = len(out.pop('disagreements'))
        return out


# ---- graph writing ----------------------------------------------------------------------------------------
class _Writer:
    """Collects ONNX nodes and initializers while walking the fx graph."""

    def __init__(self, quantized: bool):
        from onnx import helper
        self.helper, self.quantized = helper, quantized
        self.nodes, self.inits, self.names = [], [], {}
        self.weight_types: Dict[str, int] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: List[str], output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def low_bit(self, name: str, values: np.ndarray, bits: int, weight: bool = True) -> str:
        """An unsigned integer initializer in the narrowest ONNX container that holds ``bits``; ``weight``
        counts it in ``weight_types`` (a zero point does not count)."""
        from onnx import TensorProto
        kind = TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8
        if weight:
            key = 'uint4' if bits <= 4 else 'uint8'
            self.weight_types[key] = self.weight_types.get(key, 0) + 1
        self.inits.append(self.helper.make_tensor(name, kind, list(values.shape),
                                                  values.astype(np.uint8).flatten().tolist()))
        return name


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _weight(w: _Writer, name: str, layer: nn.Module) -> str:
    """The layer's weight: integer initializer + DequantizeLinear, or float when not quantized."""
    fq = getattr(layer, 'weight_fake_quant', None)
    if not w.quantized or fq is None:
        return w.const(f'{name}.weight', _np(layer.weight))
    if fq.quant_min < 0:
        raise ExportError(f'export: {name} has a signed (symmetric) weight quantizer; only asymmetric unsigned '
                          'weights are written')
    with torch.no_grad():
        on_grid = fq(layer.weight)  # the weight the fake-quant model computes with
        scale = fq.scale.detach().reshape(-1).float()
        zp = fq.zero_point.detach().reshape(-1).round()
        shape = [-1] + [1] * (on_grid.dim() - 1)
        q = torch.clamp(torch.round(on_grid / scale.reshape(shape)) + zp.reshape(shape), fq.quant_min, fq.quant_max)
    bits = quantizer_bits(fq)
    per_channel = scale.numel() > 1
    scales, zeros = scale.cpu().numpy(), zp.cpu().numpy()
    if not per_channel:  # one scale and zero point: ONNX scalars
        scales, zeros = scales.reshape(()), zeros.reshape(())
    q_name = w.low_bit(f'{name}.weight_q', q.cpu().numpy(), bits)
    s_name = w.const(f'{name}.weight_scale', scales)
    z_name = w.low_bit(f'{name}.weight_zero_point', zeros, bits, weight=False)
    axis = {'axis': 0} if per_channel else {}
    return w.node('DequantizeLinear', [q_name, s_name, z_name], f'{name}.weight', **axis)


def _act_quant(w: _Writer, name: str, fq: nn.Module, x: str) -> str:
    if not w.quantized:
        return x
    if fq.ch_axis != -1 or fq.scale.numel() != 1:
        raise ExportError(f'export: {name} quantizes activations per channel; only per-tensor is written')
    if fq.quant_min < 0:
        raise ExportError(f'export: {name} is a signed activation quantizer; only unsigned ones are written')
    scale, zp = float(fq.scale.detach().reshape(-1)[0]), int(round(float(fq.zero_point.reshape(-1)[0])))
    s = w.const(f'{name}.scale', np.array(scale, np.float32))
    z = w.const(f'{name}.zero_point', np.array(zp, np.uint8))
    q = w.node('QuantizeLinear', [x, s, z], f'{name}.q')
    out = w.node('DequantizeLinear', [q, s, z], f'{name}.dq')
    if fq.quant_max < 255 or fq.quant_min > 0:  # fewer bits than the container: its exact range
        lo = w.const(f'{name}.lo', np.array((fq.quant_min - zp), np.float32) * np.float32(scale))
        hi = w.const(f'{name}.hi', np.array((fq.quant_max - zp), np.float32) * np.float32(scale))
        out = w.node('Clip', [out, lo, hi], f'{name}.clip')
    return out


def _pair(v) -> List[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _conv(w: _Writer, name: str, m: nn.Conv2d, x: str) -> str:
    if isinstance(m.padding, str) or m.padding_mode != 'zeros':
        raise ExportError(f'export: {name} uses padding {m.padding!r}/{m.padding_mode}; only numeric zero padding '
                          'is written')
    inputs = [x, _weight(w, name, m)] + ([w.const(f'{name}.bias', _np(m.bias))] if m.bias is not None else [])
    ph, pw = _pair(m.padding)
    return w.node('Conv', inputs, name, strides=_pair(m.stride), pads=[ph, pw, ph, pw],
                  dilations=_pair(m.dilation), group=m.groups, kernel_shape=_pair(m.kernel_size))


def _linear(w: _Writer, name: str, m: nn.Linear, x: str) -> str:
    inputs = [x, _weight(w, name, m)] + ([w.const(f'{name}.bias', _np(m.bias))] if m.bias is not None else [])
    return w.node('Gemm', inputs, name, transB=1)


def _batchnorm(w: _Writer, name: str, m: nn.BatchNorm2d, x: str) -> str:
    gamma = _np(m.weight) if m.affine else np.ones(m.num_features, np.float32)
    beta = _np(m.bias) if m.affine else np.zeros(m.num_features, np.float32)
    ins = [x, w.const(f'{name}.gamma', gamma), w.const(f'{name}.beta', beta),
           w.const(f'{name}.mean', _np(m.running_mean)), w.const(f'{name}.var', _np(m.running_var))]
    return w.node('BatchNormalization', ins, name, epsilon=float(m.eps))


def _pool(w: _Writer, name: str, m: nn.Module, x: str) -> str:
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != [1, 1]:
            raise ExportError(f'export: {name} is an adaptive pool to {m.output_size}; only to 1x1 is written')
        return w.node('GlobalAveragePool', [x], name)
    if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != [1, 1]:
        raise ExportError(f'export: {name} is a dilated max pool; not written')
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        raise ExportError(f'export: {name} is an average pool with divisor_override={m.divisor_override}; ONNX '
                          'AveragePool divides by the window size, so it is not written')
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise ExportError(f'export: {name} is a max pool that returns indices; not written')
    p = _pair(m.padding)
    attrs = dict(kernel_shape=_pair(m.kernel_size), strides=_pair(m.stride or m.kernel_size), pads=p + p,
                 ceil_mode=int(bool(m.ceil_mode)))
    if isinstance(m, nn.AvgPool2d):
        attrs['count_include_pad'] = int(m.count_include_pad)
        return w.node('AveragePool', [x], name, **attrs)
    return w.node('MaxPool', [x], name, **attrs)


def _module(w: _Writer, name: str, m: nn.Module, x: str) -> str:
    if is_act_quantizer(m):
        return _act_quant(w, name, m, x)
    if isinstance(m, nn.Conv2d):
        return _conv(w, name, m, x)
    if isinstance(m, nn.Linear):
        return _linear(w, name, m, x)
    if isinstance(m, nn.BatchNorm2d):
        return _batchnorm(w, name, m, x)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(m, nn.ReLU):
        return w.node('Relu', [x], name)
    if isinstance(m, nn.ReLU6):
        return w.node('Clip', [x, w.const(f'{name}.lo', np.array(0, np.float32)),
                               w.const(f'{name}.hi', np.array(6, np.float32))], name)
    if type(m) in ACTIVATIONS:
        return _activation(w, name, ACTIVATIONS[type(m)], x, getattr(m, 'negative_slope', None))
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _pool(w, name, m, x)
    if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1):  # ONNX Flatten always gives 2-D
        return w.node('Flatten', [x], name, axis=1)
    raise ExportError(f'export: module {name} ({type(m).__name__}) has no ONNX form in the exporter')


ACTIVATIONS = {nn.Sigmoid: 'Sigmoid', nn.SiLU: 'SiLU', nn.Hardswish: 'HardSwish', nn.Hardsigmoid: 'HardSigmoid',
               nn.LeakyReLU: 'LeakyRelu', nn.Tanh: 'Tanh'}
FUNCTIONS = {torch.sigmoid: 'Sigmoid', torch.nn.functional.sigmoid: 'Sigmoid', torch.nn.functional.silu: 'SiLU',
             torch.nn.functional.hardswish: 'HardSwish', torch.nn.functional.hardsigmoid: 'HardSigmoid',
             torch.tanh: 'Tanh'}


def _activation(w: _Writer, name: str, op: str, x: str, slope: Optional[float] = None) -> str:
    """An element-wise activation. SiLU is x * sigmoid(x); HardSigmoid uses PyTorch's slope 1/6 (ONNX's
    default is 0.2)."""
    if op == 'SiLU':
        return w.node('Mul', [x, w.node('Sigmoid', [x], f'{name}.sigmoid')], name)
    if op == 'HardSigmoid':
        return w.node('HardSigmoid', [x], name, alpha=1.0 / 6, beta=0.5)
    if op == 'LeakyRelu':
        return w.node('LeakyRelu', [x], name, alpha=float(slope))
    return w.node(op, [x], name)


def _function(w: _Writer, node: fx.Node, args: List[Any]) -> str:
    t, name = node.target, node.name
    if t in (operator.add, torch.add) and len(args) == 2 and all(isinstance(a, str) for a in args):
        return w.node('Add', args, name)
    if t in (operator.mul, torch.mul) and len(args) == 2 and all(isinstance(a, str) for a in args):
        return w.node('Mul', args, name)
    if t is torch.flatten and _flatten_dims(args, node.kwargs) == (1, -1):
        return w.node('Flatten', [args[0]], name, axis=1)
    if t is torch.nn.functional.relu:
        return w.node('Relu', [args[0]], name)
    if t is torch.nn.functional.adaptive_avg_pool2d and _pair(args[1] if len(args) > 1 else
                                                              node.kwargs.get('output_size')) == [1, 1]:
        return w.node('GlobalAveragePool', [args[0]], name)
    if getattr(t, '__name__', '') == 'stochastic_depth' and not (args[3] if len(args) > 3 else
                                                                 node.kwargs.get('training', True)):
        return args[0]  # torchvision's stochastic depth outside training is the identity
    if t in FUNCTIONS and not node.kwargs.get('inplace', False):
        return _activation(w, name, FUNCTIONS[t], args[0])
    if t is torch.cat and isinstance(args[0], (list, tuple)):
        return w.node('Concat', list(args[0]), name, axis=int(args[1] if len(args) > 1 else node.kwargs.get('dim', 0)))
    raise ExportError(f'export: function {getattr(t, "__name__", t)} at {name} has no ONNX form in the exporter')


def _flatten_dims(args: List[Any], kwargs: Dict[str, Any]) -> Tuple[Any, Any]:
    """(start_dim, end_dim) of a traced ``torch.flatten(x, ...)`` or ``x.flatten(...)``, positional or keyword.
    Only (1, -1) is ONNX's Flatten(axis=1); anything else is refused rather than written differently."""
    start = args[1] if len(args) > 1 else kwargs.get('start_dim', 0)
    end = args[2] if len(args) > 2 else kwargs.get('end_dim', -1)
    return start, end


def _method(w: _Writer, node: fx.Node, args: List[Any]) -> str:
    name, x = node.name, args[0]
    if node.target == 'mean':
        dims = args[1] if len(args) > 1 else node.kwargs.get('dim')
        dims = [dims] if isinstance(dims, int) else list(dims)
        keep = int(bool(args[2] if len(args) > 2 else node.kwargs.get('keepdim', False)))
        return w.node('ReduceMean', [x, w.const(f'{name}.axes', np.array(dims, np.int64))], name, keepdims=keep)
    if node.target == 'flatten' and _flatten_dims(args, node.kwargs) == (1, -1):
        return w.node('Flatten', [x], name, axis=1)
    raise ExportError(f'export: method .{node.target}() at {name} has no ONNX form in the exporter')


def build_onnx(qmodel: fx.GraphModule, sample: torch.Tensor, quantized: bool = True):
    """The ONNX model of the quantized (or, with ``quantized=False``, the same float) graph."""
    from onnx import TensorProto, helper
    w = _Writer(quantized)
    modules = dict(qmodel.named_modules())
    env: Dict[fx.Node, Any] = {}
    out_name = None
    for node in qmodel.graph.nodes:
        args = [env[a] if isinstance(a, fx.Node) else
                ([env[b] if isinstance(b, fx.Node) else b for b in a] if isinstance(a, (list, tuple)) else a)
                for a in node.args]
        if node.op == 'placeholder':
            env[node] = 'input'
        elif node.op == 'call_module':
            env[node] = _module(w, node.target, modules[node.target], args[0])
        elif node.op == 'call_function':
            env[node] = _function(w, node, args)
        elif node.op == 'call_method':
            env[node] = _method(w, node, args)
        elif node.op == 'output':
            out_name = args[0]
        else:
            raise ExportError(f'export: graph node {node.name} ({node.op}) has no ONNX form in the exporter')
    if not isinstance(out_name, str):
        raise ExportError('export: the model must return one tensor (the logits)')
    w.nodes.append(helper.make_node('Identity', [out_name], ['logits']))
    shape = ['batch', *sample.shape[1:]]
    graph = helper.make_graph(w.nodes, 'mrecg_quantized' if quantized else 'mrecg_float',
                              [helper.make_tensor_value_info('input', TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', None])],
                              w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)], producer_name='mrecg')
    return model, w.weight_types


def check_exportable(qmodel: fx.GraphModule, sample: Optional[torch.Tensor]) -> None:
    """Before any heavy work: the exporter can write every node of the prepared (not yet calibrated) model,
    and onnx / onnxruntime are installed. Raises ``ExportError`` / ``UserError`` naming what is missing."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(f'--export onnx needs {exc.name}: pip install onnx onnxruntime') from None
    if sample is None:
        raise ExportError('export: the calibration data gives no sample image to size the graph with')
    model, _ = build_onnx(qmodel, sample, quantized=True)
    onnx.checker.check_model(model)


# ---- checking in onnxruntime ------------------------------------------------------------------------------
def _session(path: str):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _latency_ms(session, sample: np.ndarray, repeats: int = 50) -> float:
    for _ in range(5):
        session.run(None, {'input': sample})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {'input': sample})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


@torch.no_grad()
def _compare(session, qmodel: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], report: ExportReport,
             device: torch.device = torch.device('cpu')):
    """onnxruntime's and the fake-quant model's top-1 on the same batches, the images whose top-1 classes
    differ (positions in the evaluation order) and the largest logit difference, into ``report``. The fake-quant
    model runs on ``device`` (the run's), in full float32 (no TF32), and goes back to the CPU afterwards."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        try:
            _compare_batches(session, qmodel.to(device).eval(), batches, report, device)
        finally:
            qmodel.cpu()


def _compare_batches(session, qmodel, batches, report: ExportReport, device: torch.device):
    hits_ort = hits_fq = total = 0
    max_diff, differ = 0.0, []
    for x, y in batches:
        ref = qmodel(x.to(device, torch.float32, non_blocking=True)).float().cpu()
        got = torch.from_numpy(session.run(None, {'input': x.float().cpu().numpy()})[0])
        diff = (got - ref).abs()
        max_diff = max(max_diff, float(torch.nan_to_num(diff, nan=float('inf')).max()))  # NaN logits: inf
        hits_ort += int((got.argmax(1) == y).sum())
        hits_fq += int((ref.argmax(1) == y).sum())
        differ += (torch.nonzero(got.argmax(1) != ref.argmax(1)).flatten() + total).tolist()
        total += len(y)
    if total == 0:
        raise ExportError('export: the evaluation data is empty')
    report.onnxruntime_top1, report.fake_quant_top1 = 100.0 * hits_ort / total, 100.0 * hits_fq / total
    report.agreement, report.max_logit_diff, report.eval_images = 100.0 * (total - len(differ)) / total, max_diff, total
    report.top1_gap, report.disagreements = abs(report.onnxruntime_top1 - report.fake_quant_top1), differ


def export_onnx(qmodel: fx.GraphModule, path: str, sample: torch.Tensor,
                eval_batches: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None,
                device: Union[str, torch.device] = 'cpu') -> ExportReport:
    """Write ``path`` (quantized) and ``<path stem>.float.onnx`` (the same graph in float), load both in
    onnxruntime, time them at batch 1 and, with ``eval_batches``, compare top-1, argmax and logits with the
    fake-quant model (run on ``device``). ``sample`` is an input batch (for the shape). ``check_export``
    applies the agreement rule."""
    import onnx
    import onnxruntime as ort
    float_path = os.path.splitext(path)[0] + '.float.onnx'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model, types = build_onnx(qmodel, sample, quantized=True)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    onnx.save(build_onnx(qmodel, sample, quantized=False)[0], float_path)
    q_session, f_session = _session(path), _session(float_path)
    one = sample[:1].float().cpu().numpy()
    report = ExportReport(path, float_path, OPSET, os.path.getsize(path), os.path.getsize(float_path), types,
                          onnxruntime=ort.__version__,
                          latency_ms={'quantized': _latency_ms(q_session, one), 'float': _latency_ms(f_session, one)})
    if eval_batches is not None:
        _compare(q_session, qmodel, eval_batches, report, torch.device(device))
    return report


def judge_export(report: ExportReport, rule=None) -> bool:
    """Apply the rule (``mrecg.config.ExportConfig``): the two engines agree on the top-1 class of at least
    ``min_agreement`` % of the images AND their top-1 accuracies differ by at most max(``max_top1_gap`` points,
    ``max_gap_images`` images). Records the rule, the allowed gap and the verdict in ``report.check``."""
    from mrecg.config import ExportConfig
    rule = rule or ExportConfig()
    if report.onnxruntime_top1 is None:
        report.check = {'rule': asdict(rule), 'passed': None}
        return True
    allowed = max(rule.max_top1_gap, 100.0 * rule.max_gap_images / report.eval_images)
    passed = report.agreement >= rule.min_agreement and report.top1_gap <= allowed + 1e-9
    report.check = {'rule': asdict(rule), 'allowed_gap': allowed, 'passed': passed}
    return passed


def check_export(report: ExportReport, rule=None, mismatches: Optional[str] = None) -> None:
    """The verdict of ``mrecg.export.judge_export`` (documented beside it), raised as an ``ExportError`` that names
    both figures and where the differing images are listed (``mismatches``: the file the caller wrote them to)."""
    if judge_export(report, rule):
        return
    c = report.check
    where = f'; they are listed in {mismatches}' if mismatches else ''
    raise ExportError(f'export: onnxruntime and the fake-quant model agree on the top-1 class of '
                      f'{report.agreement:.2f} % of {report.eval_images} images '
                      f'(rule: >= {c["rule"]["min_agreement"]}) '
                      f'and their top-1 differ by {report.top1_gap:.2f} points ({report.onnxruntime_top1:.2f} vs '
                      f'{report.fake_quant_top1:.2f}; rule: <= {c["allowed_gap"]:.2f}); '
                      f'{len(report.disagreements)} images differ{where}')
