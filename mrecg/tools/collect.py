"""Turn the results.json files under a folder into the paper's table (Markdown and CSV).

    mrecg collect outputs/fashion_bench            # prints Markdown, writes table.md/.csv
    mrecg collect outputs/a outputs/b --out results/table

Rows: Full Prec. first, then each method at each W/A (paper order 4/4, 2/4, 3/3, 2/2); columns: models.
Cells: top-1 mean +- standard deviation over seeds (n = number of seeds); MRECG rows carry the difference
of means to the plain method they build on (BRECQ or QDrop) in brackets, marked with a cross when it is
below the plain method by more than the plain method's seed standard deviation. A second table gives the max
per-unit reconstruction loss the same way. The CSV has one row per (model, W/A, method) with all figures.

Loss curves (the paper's figure, ``--no-curves`` to skip): for each model and W/A, the per-base-unit
reconstruction loss along the network, averaged over seeds, one line per method that has the same base
units (block-wise methods; layer-wise AdaRound has other units), written as ``<prefix>_curves_<model>_w<W>a<A>.png``
and as numbers in ``<prefix>_curves.md``.
"""
import argparse
import csv
import math
import os
import re
import statistics
import sys
from collections import Counter, defaultdict

from mrecg.config import PAPER_RULE
from mrecg.errors import UserError
from mrecg.files import BadFile, read_json
from mrecg.helptext import PlainHelp

BITS_ORDER = [(4, 4), (2, 4), (3, 3), (2, 2)]
METHOD_ORDER = ['nearest', 'adaround', 'mqbench-brecq', 'brecq', 'mrecg+brecq', 'mqbench-qdrop', 'qdrop',
                'mrecg+qdrop']
PRETTY = {'nearest': 'Nearest', 'adaround': 'AdaRound', 'brecq': 'BRECQ', 'qdrop': 'QDrop',
          'mqbench-brecq': 'MQBench BRECQ', 'mqbench-qdrop': 'MQBench QDrop'}
# grouping options that differ from the defaults (the measured safe rule); the paper's rule has its own label
OPTION_LABELS = {('difference', 'squared'): 'squared', ('difference', 'relative'): 'relative',
                 ('pairs', 'falls'): 'falls', ('exclude_classifier', False): 'with classifier',
                 ('group_iterations', 'one_unit'): 'its of one unit'}
SETTING_LABELS = {('ste_bounds', 'inclusive'): 'inclusive STE', ('head_ops', 'last_block'): 'head in last block'}
SOURCE = {'modcap solver': 'ModCap', 'loss solver': 'loss', 'published scheme': 'authors', 'explicit scheme': 'scheme'}


def find_results(folders):
    """Every run's results.json under the folders (a run kept by --overwrite in previous_run/ is not one)."""
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != 'previous_run')
            if 'results.json' in files:
                try:
                    yield read_json(os.path.join(root, 'results.json'), 'results')
                except BadFile as exc:  # one cut-off run does not hide the others
                    print(f'warning: {exc}: left out of the table', file=sys.stderr)


def model_label(r):
    kw = r.get('model_kwargs') or {}
    width = f' x{kw["width_mult"]}' if 'width_mult' in kw else ''
    part = f', {r["quantize_part"]}' if r.get('quantize_part') else ''
    return f'{r["model"]}{width}{part} ({r["dataset"]})'


def settings_label(r):
    """Settings that change every method, when not the default: ' [inclusive STE, head in last block]'."""
    s = r.get('settings', {})
    marks = [SETTING_LABELS[(key, value)] for key, value in (
        ('ste_bounds', s.get('a_qconfig', {}).get('ste_bounds', 'strict')),
        ('head_ops', s.get('reconstruction', {}).get('head_ops', 'classifier'))) if (key, value) in SETTING_LABELS]
    if r.get('bit_search'):  # mixed precision: its budget and measure, never pooled with the uniform rows
        (kind, value), = r['bit_search']['budget'].items()
        marks.append(f'mixed {kind} {value:g}, {r["bit_search"]["measure"]}')
    return f' [{", ".join(marks)}]' if marks else ''


def method_label(r):
    method = r['method']
    if not method.startswith('mrecg+'):
        return PRETTY.get(method, method) + settings_label(r)
    g = r['grouping']
    opts = g.get('options') or PAPER_RULE  # runs from before the options were made with the paper's rule
    kind = SOURCE.get(g['source'], g['source'])
    k = '' if kind in ('authors', 'scheme') else f', k={opts.get("k", g["k"])}'
    if all(opts.get(key) == value for key, value in PAPER_RULE.items()):
        extra = ', paper rule'
    else:
        extra = ''.join(f', {OPTION_LABELS[(key, value)]}' for key, value in opts.items() if (key, value) in OPTION_LABELS)
    return f'MRECG({kind}{k}{extra})+{PRETTY[method.split("+", 1)[1]]}' + settings_label(r)


def method_rank(r):
    base = r['method']
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method_label(r))


def stats(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def fmt(mean, std, n, digits=2):
    if mean is None:
        return '-'
    return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if n > 1 else '')


def score(r, which='quant'):
    """A run's headline figure (``quant`` or ``fp``): its metric's score, top-1 for older results."""
    return r.get(f'{which}_score', r[f'{which}_top1'])


def metric_of(cells) -> str:
    """The one metric the collected runs share; runs scored differently are not put in one table."""
    found = sorted({r.get('metric', 'top1') for runs in cells.values() for r in runs})
    if len(found) > 1:
        raise UserError(f'the results mix the metrics {", ".join(found)}: collect each kind in its own folder')
    return found[0] if found else 'top1'


METRIC_TITLES = {'top1': 'Top-1 accuracy (%)', 'miou': 'Mean IoU (%)', 'map': 'COCO mAP@[.5:.95] (%)'}


def collect(folders):
    cells = defaultdict(list)   # (model, bits, method label) -> results
    fp = defaultdict(list)
    rank = {}
    for r in find_results(folders):
        model, bits = model_label(r), (r['w_bits'], r['a_bits'])
        label = method_label(r)
        cells[(model, bits, label)].append(r)
        fp[model].append(score(r, 'fp'))
        rank[label] = method_rank(r)
    return cells, fp, rank


def baseline_of(label):
    """The plain method an MRECG row builds on: MRECG(...)+QDrop -> QDrop."""
    return label.split(')+', 1)[1] if label.startswith('MRECG(') else None


def build_tables(cells, fp, rank):
    models = sorted(fp)
    metric = metric_of(cells)
    name = 'top1' if metric == 'top1' else metric
    rows_top1, rows_loss, csv_rows = [], [], []
    head = '| Method | W/A | ' + ' | '.join(models) + ' |'
    sep = '|' + '---|' * (len(models) + 2)
    fp_cells = [fmt(*stats(fp[m])) if len(set(fp[m])) > 1 else fmt(fp[m][0], 0, 1) for m in models]  # one model: one value
    rows_top1 += [head, sep, '| Full Prec. | 32/32 | ' + ' | '.join(fp_cells) + ' |']
    rows_loss += [head, sep]
    present_bits = sorted({b for (_, b, _) in cells}, key=lambda b: (BITS_ORDER.index(b) if b in BITS_ORDER else 9, b))
    for bits in present_bits:
        labels = sorted({lab for (_, b, lab) in cells if b == bits}, key=lambda lab: rank[lab])
        for label in labels:
            top1_cells, loss_cells = [], []
            for model in models:
                runs = cells.get((model, bits, label), [])
                mean, std, n = stats([score(r) for r in runs])
                cell = fmt(mean, std, n)
                base = baseline_of(label)
                delta = base_std = None
                if base and mean is not None:
                    base_mean, base_std, _ = stats([score(r) for r in cells.get((model, bits, base), [])])
                    if base_mean is not None:
                        delta = mean - base_mean
                        worse = delta < -base_std  # below the plain method by more than its seed std
                        cell += f' ({delta:+.2f}{" ✗" if worse else ""})'
                top1_cells.append(cell)
                lmean, lstd, ln = stats([r['loss_curve']['max_unit_loss'] for r in runs])
                loss_cells.append(fmt(lmean, lstd, ln, 3))
                omean = stats([r['loss_curve']['oscillation'] for r in runs])[0]
                if runs:
                    csv_rows.append({'model': model, 'w_bits': bits[0], 'a_bits': bits[1], 'method': label, 'n': n,
                                     f'{name}_mean': mean, f'{name}_std': std, 'delta_vs_plain': delta,
                                     f'plain_{name}_std': base_std,
                                     'worse_than_plain': None if delta is None else delta < -base_std,
                                     'max_unit_loss_mean': lmean, 'max_unit_loss_std': lstd,
                                     'oscillation_mean': omean, f'fp_{name}': stats(fp[model])[0]})
            row = f'| {label} | {bits[0]}/{bits[1]} | '
            rows_top1.append(row + ' | '.join(top1_cells) + ' |')
            rows_loss.append(row + ' | '.join(loss_cells) + ' |')
    return rows_top1, rows_loss, csv_rows


def mean_curves(cells):
    """(model, bits) -> (base-unit names, {method label: mean loss per base unit over seeds}), for the methods
    whose runs share the most common base-unit list of that model (the block partition)."""
    by_setting = defaultdict(dict)
    for (model, bits, label), runs in cells.items():
        lists = [r.get('unit_losses') or [] for r in runs]
        names = [u['name'] for u in lists[0]] if lists and lists[0] else None
        if not names or any([u['name'] for u in lst] != names for lst in lists):
            continue
        losses = [[u['loss'] for u in lst] for lst in lists]
        by_setting[(model, bits)][label] = (tuple(names), [stats(col)[0] for col in zip(*losses)])
    out = {}
    for key, curves in by_setting.items():
        names = Counter(n for n, _ in curves.values()).most_common(1)[0][0]
        out[key] = (list(names), {lab: vals for lab, (n, vals) in curves.items() if n == names})
    return out


def write_curves(curves, rank, prefix):
    from mrecg.reporting import oscillation_stats, plot_loss_curve
    lines = ['Mean per-unit reconstruction loss along the network (over seeds); osc = oscillation statistic '
             '(sum of drops / peak)\n']
    for (model, bits), (names, by_label) in sorted(curves.items(), key=lambda kv: (kv[0][0], BITS_ORDER.index(kv[0][1])
                                                                                  if kv[0][1] in BITS_ORDER else 9)):
        labels = sorted(by_label, key=lambda lab: rank[lab])
        safe = re.sub(r'[^0-9A-Za-z.]+', '_', model).strip('_')   # 'mobilenet_v2_small (digits)' -> ..._small_digits
        path = f'{prefix}_curves_{safe}_w{bits[0]}a{bits[1]}.png'
        plot_loss_curve(path, names, {lab: by_label[lab] for lab in labels},
                        title=f'{model} W{bits[0]}A{bits[1]}: per-unit reconstruction loss, mean over seeds')
        lines += [f'### {model} W{bits[0]}A{bits[1]}', '', '| method | ' + ' | '.join(names) + ' | max | osc |',
                  '|' + '---|' * (len(names) + 3)]
        for lab in labels:
            vals = by_label[lab]
            st = oscillation_stats(names, vals)
            cells = ' | '.join('-' if v is None else f'{v:.3g}' for v in vals)
            osc = '-' if st['oscillation'] is None else f'{st["oscillation"]:.2f}'
            peak = '-' if st['max_unit_loss'] is None else f'{st["max_unit_loss"]:.3g}'
            lines.append(f'| {lab} | {cells} | {peak} | {osc} |')
        lines.append('')
    with open(prefix + '_curves.md', 'w') as f:
        f.write('\n'.join(lines))
    return len(curves)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg collect', description=__doc__,
                                formatter_class=PlainHelp)
    p.add_argument('folders', nargs='+', help='folders searched for results.json (a sweep\'s --out)')
    p.add_argument('--out', help='path prefix of the .md and .csv (default: <first folder>/table)')
    p.add_argument('--no-curves', action='store_true', help='skip the loss-curve plots and numbers')
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    cells, fp, rank = collect(args.folders)
    if not cells:
        print(f'error: no results.json under {", ".join(args.folders)}', file=sys.stderr)
        return 2
    try:
        top1, loss, rows = build_tables(cells, fp, rank)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    metric = metric_of(cells)
    text = (f'{METRIC_TITLES.get(metric, metric)}, mean ± std over seeds; MRECG rows: difference to the plain '
            'method in brackets\n\n'
            + '\n'.join(top1) + '\n\nMax per-unit reconstruction loss, mean ± std over seeds\n\n' + '\n'.join(loss)
            + '\n')
    prefix = args.out or os.path.join(args.folders[0], 'table')
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + '.md', 'w') as f:
        f.write(text)
    with open(prefix + '.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(text)
    print(f'wrote {prefix}.md and {prefix}.csv')
    if not args.no_curves:
        n = write_curves(mean_curves(cells), rank, prefix)
        print(f'wrote {n} loss-curve plots {prefix}_curves_*.png and their numbers in {prefix}_curves.md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
