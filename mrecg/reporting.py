"""Everything a run leaves on disk: log, results.json / results.csv, loss_curve.png, all written atomically.

Oscillation statistic (the paper's subject): with base-unit losses L_1..L_n along the network,

    oscillation = sum_l max(0, L_l - L_{l+1}) / max_l L_l

i.e. the total of every drop of the loss curve, relative to its peak. A curve that only rises (pure
error accumulation, the paper's Theorem 1 for equivalent modules) scores 0; each drop caused by a
high-capacity unit after a low-capacity one adds its relative size. ``max_unit_loss`` is the peak itself.
"""
import csv
import io
import itertools
import json
import logging
import math
import os
import tempfile
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

log = logging.getLogger('mrecg')


class TqdmHandler(logging.Handler):
    """Console log lines that do not tear tqdm's progress bars."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(log_file: Optional[str] = None, quiet: bool = False) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S')
    if not quiet:
        console = TqdmHandler()
        console.setFormatter(fmt)
        log.addHandler(console)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        log.addHandler(handler)


# ---- atomic files -------------------------------------------------------------------------------------
def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def json_safe(obj: Any) -> Any:
    """NaN/Inf become null: a non-finite number is never written as a result (and never crashes the write)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + '\n')


def on_cpu(obj: Any) -> Any:
    """Every tensor in ``obj`` (dicts, lists, tuples) moved to the CPU: saved files load on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def save_torch(path: str, obj: Any) -> None:
    """``torch.save`` atomically, with every tensor on the CPU (a GPU run's files load without a GPU)."""
    obj = on_cpu(obj)
    _atomic(path, lambda f: torch.save(obj, f))


def write_csv_row(path: str, row: Dict[str, Any]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)
    write_text(path, buf.getvalue())


def finite_or_none(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


# ---- loss-curve statistics and plot ---------------------------------------------------------------------
def oscillation_stats(names: Sequence[str], losses: Sequence[Optional[float]]) -> Dict[str, Any]:
    vals = [v for v in losses if v is not None and math.isfinite(v)]
    if len(vals) != len(losses) or not vals:
        return {'oscillation': None, 'max_unit_loss': None, 'max_loss_unit': None, 'final_unit_loss': None}
    peak = max(vals)
    drops = sum(max(0.0, a - b) for a, b in zip(vals, vals[1:]))
    return {'oscillation': drops / peak if peak > 0 else 0.0, 'max_unit_loss': peak,
            'max_loss_unit': names[vals.index(peak)], 'final_unit_loss': vals[-1]}


def plot_loss_curve(path: str, names: Sequence[str], curves: Dict[str, Sequence[Optional[float]]],
                    spans: Sequence[Tuple[int, int]] = (), title: str = '') -> None:
    """Reconstruction loss per base unit along the network, one line per run (plain vs MRECG), merged
    groups shaded, log scale (like the paper's figure)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    width = max(6.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.2))
    for first, last in spans:
        ax.axvspan(first - 0.4, last + 0.4, color='tab:orange', alpha=0.15, lw=0)
    for (label, losses), marker in zip(curves.items(), itertools.cycle('os^dvP*X')):
        xs = [i for i, v in enumerate(losses) if v is not None and v > 0]
        ax.plot(xs, [losses[i] for i in xs], marker=marker, ms=4, label=label)
    ax.set_yscale('log')
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
    ax.set_ylabel('reconstruction loss (log)')
    title = title or 'per-unit reconstruction loss' + (' (shaded: jointly reconstructed)' if spans else '')
    ax.set_title(textwrap.fill(title, width=int(width * 11)), fontsize=9)  # ~11 characters per inch at 9 pt
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    _atomic(path, lambda f: f.write(buf.getvalue()))


def unit_loss_table(names: Sequence[str], losses: Sequence[Optional[float]], extra: Dict[str, Sequence] = None) -> List[Dict]:
    rows = []
    for i, (name, loss) in enumerate(zip(names, losses)):
        row = {'name': name, 'loss': finite_or_none(loss)}
        for key, vals in (extra or {}).items():
            row[key] = vals[i]
        rows.append(row)
    return rows
