"""Everything a run leaves on disk: log, results.json / results.csv, loss_curve.png, all written atomically.

Oscillation statistic (the paper's subject): with base-unit losses L_1..L_n along the network,

    oscillation = sum_l max(0, L_l - L_{l+1}) / max_l L_l

i.e. the total of every drop of the loss curve, relative to its peak. A curve that only rises (pure
error accumulation, the paper's Theorem 1 for equivalent modules) scores 0; each drop caused by a
high-capacity unit after a low-capacity one adds its relative size. ``max_unit_loss`` is the peak itself.
"""
import csv
import errno
import io
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from mrecg.errors import UserError

log = logging.getLogger('mrecg')


class TqdmHandler(logging.Handler):
    """Console log lines that do not tear tqdm's progress bars."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class LogFile(logging.FileHandler):
    """``run.log``; when the disk refuses a line (full, read-only) it says so once on the console and stops
    writing, instead of printing a traceback per line."""

    def handleError(self, record):
        if self.stream is not None and not getattr(self, 'failed', False):
            self.failed = True
            tqdm.write(f'warning: cannot write {self.baseFilename} any more; the log continues on the console only')
        self.close()

    def emit(self, record):
        if not getattr(self, 'failed', False):
            super().emit(record)


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
        handler = LogFile(log_file)
        handler.setFormatter(fmt)
        log.addHandler(handler)


def close_log_file() -> None:
    """The end of a run: ``run.log`` is closed (a caller that runs again in the same process, or unmounts the
    output's disk, must not find it held open)."""
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


# ---- atomic files -------------------------------------------------------------------------------------
FULL = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'the disk quota is used up',
        errno.EROFS: 'the file system is read-only', errno.EFBIG: 'the file size limit is reached'}


class DiskFull(UserError):
    """A write refused by the file system (no space, quota, read-only): the previous file is untouched."""


def free_space(folder: str) -> str:
    try:
        return f'{shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free'
    except OSError:
        return 'free space unknown'


def _atomic(path: str, write) -> None:
    """Write ``path`` through a temporary file in its folder and rename it over: a reader sees the old file or the
    new one, never half of one. A full or read-only disk is one ``DiskFull`` line naming the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        if tmp is not None and os.path.exists(tmp):  # gone before the free space is measured
            os.unlink(tmp)
        raise DiskFull(f'cannot write {os.path.basename(path)} in {folder}: {FULL[exc.errno]} '
                       f'({free_space(folder)}); the previous version of the file, if any, is kept: free space there') from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


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
    buf = io.BytesIO()  # serialised first: torch's own writer reports a full disk as "unexpected pos"
    torch.save(on_cpu(obj), buf)
    _atomic(path, lambda f: f.write(buf.getbuffer()))


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
