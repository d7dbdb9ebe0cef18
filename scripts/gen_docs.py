#!/usr/bin/env python
"""Write the generated parts of README.md and docs/ from the code and the data files, or check that they are
current (CI: ``--check``, exit 1 naming every stale file).

    python scripts/gen_docs.py            # rewrite
    python scripts/gen_docs.py --check    # compare only

Whole pages: ``docs/reference/config.md`` (every key of ``mrecg.Config``: type, default, range, doc),
``docs/reference/cli.md`` (every command's ``--help`` from its parser) and ``docs/reference/models.md`` (the
registry and ``results/model_coverage.csv``). Blocks inside hand-written pages, between
``<!-- generated: NAME key=value ... -->`` and ``<!-- end generated -->``, are rendered by the function
``block_NAME`` below, from ``results/*.csv`` / ``*.json``: a number is written once, in its data file, with the
command, machine, date and commit that produced it.
"""
import argparse
import csv
import inspect
import json
import os
import re
import shlex
import sys
import typing
from dataclasses import MISSING, fields
from typing import Dict, List

import docs_plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'results')
BLOCK = re.compile(r'(<!-- generated: (?P<name>\w+)(?P<args>[^>]*?)-->\n)(?P<body>.*?)(<!-- end generated -->)', re.S)
PROVENANCE = ('date', 'commit', 'machine', 'versions', 'command')


# ---- data ----------------------------------------------------------------------------------------------------
def rows_of(name: str) -> List[Dict[str, str]]:
    with open(os.path.join(RESULTS, name + '.csv'), newline='') as f:
        return list(csv.DictReader(f))


def select(rows, where: str):
    """``where=col:value;col2:value2`` keeps the rows whose columns hold those values."""
    for clause in filter(None, (where or '').split(';')):
        col, _, value = clause.partition(':')
        rows = [r for r in rows if r[col] == value]
    return rows


def provenance(name: str, rows) -> str:
    """Where the numbers of a table come from: its data file and each distinct command, machine, date, commit.
    A field a row does not have (empty or ``-``, e.g. the published numbers have no commit) is left out."""
    seen = []
    for r in rows:
        key = tuple(r.get(k, '') for k in PROVENANCE)
        if key not in seen:
            seen.append(key)
    lines = [f'<small>Data: `results/{name}.csv`.']
    for date, commit, machine, versions, command in seen:
        known = lambda v: v.strip() not in ('', '-')  # noqa: E731
        head = ' — '.join(filter(None, [f'`{command}`' if known(command) else '', machine if known(machine) else '']))
        tail = '; '.join(filter(None, [versions if known(versions) else '',
                                       ', '.join(filter(None, [date if known(date) else '',
                                                               f'commit {commit}' if known(commit) else '']))]))
        lines.append(' ' + '; '.join(filter(None, [head, tail])) + '.')
    return ''.join(lines) + '</small>'


UNIT = re.compile(r'(\d) (s|ms|h|min|GiB|MiB|MB|kB|GB|%|×)(?![\w])')


def cell(value) -> str:
    """A table cell: pipes escaped; angle brackets outside code spans escaped (else they read as HTML tags); a
    number keeps its unit and its ± on its line (no-break spaces: "86.3 s" never wraps into "86.3 / s")."""
    parts = str(value).replace('|', '\\|').split('`')
    return '`'.join(p if i % 2 else UNIT.sub('\\1\u00a0\\2', p.replace(' ± ', '\u00a0±\u00a0'))
                    .replace('<', '&lt;').replace('>', '&gt;') for i, p in enumerate(parts))


def markdown_table(header: List[str], body: List[List[str]]) -> str:
    """A pipe table; a row with another number of cells than the header is refused (a renderer drops the extra
    cells silently, which is how columns went missing before)."""
    for row in body:
        if len(row) != len(header):
            raise ValueError(f'a table row has {len(row)} cells under {len(header)} headers: {row[:3]}...')
    out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    out += ['| ' + ' | '.join(cell(c) for c in row) + ' |' for row in body]
    return '\n'.join(out)


def mean_std(r: Dict[str, str], mean: str = 'top1_mean', std: str = 'top1_std', delta: str = 'delta_vs_plain',
             worse: str = 'below_plain') -> str:
    if not r.get(mean):
        return '-'
    cell = r[mean] + (f' ± {r[std]}' if r.get(std) else '')
    if r.get(delta):
        cell += f' ({r[delta]}{" ✗" if r.get(worse) == "True" else ""})'
    return cell


# ---- blocks ----------------------------------------------------------------------------------------------------
def block_table(file: str, columns: str = '', where: str = '', headers: str = '') -> str:
    """The rows of a data file (``columns`` to show, comma-separated; ``headers`` to rename them)."""
    rows = select(rows_of(file), where)
    cols = columns.split(',') if columns else [c for c in rows[0] if c not in PROVENANCE]
    names = headers.split(',') if headers else cols
    if len(names) != len(cols):
        raise ValueError(f'{len(names)} headers for {len(cols)} columns of results/{file}.csv: {names}')
    missing = [c for c in cols if c not in rows[0]]
    if missing:
        raise ValueError(f'results/{file}.csv has no column {", ".join(missing)} (it has {", ".join(rows[0])})')
    return markdown_table(names, [[r[c] for c in cols] for r in rows]) + '\n\n' + provenance(file, rows)


def block_pivot(file: str, rows_by: str, cols_by: str, where: str = '', kind: str = 'top1', value: str = '') -> str:
    """Long rows pivoted: one table row per ``rows_by`` values, one column per ``cols_by`` value; cells are
    ``mean ± std (delta)`` (``kind=top1`` or ``loss``) or the column ``value``."""
    rows = select(rows_of(file), where)
    keys = rows_by.split(',')
    columns = list(dict.fromkeys(r[cols_by] for r in rows))
    order = list(dict.fromkeys(tuple(r[k] for k in keys) for r in rows))
    table = {(tuple(r[k] for k in keys), r[cols_by]): r for r in rows}
    render = (lambda r: r[value]) if value else {
        'top1': mean_std, 'loss': lambda r: mean_std(r, 'max_unit_loss_mean', 'max_unit_loss_std', delta=''),
        'miou': lambda r: mean_std(r, 'miou_mean', 'miou_std'), 'map': lambda r: mean_std(r, 'map_mean', 'map_std')}[kind]
    body = [[*key, *(render(table[(key, c)]) if (key, c) in table else '-' for c in columns)] for key in order]
    labels = [{'w_a': 'W/A'}.get(k, k.replace('_', ' ')) for k in keys]
    return markdown_table(labels + columns, body) + '\n\n' + provenance(file, rows)


def block_demo() -> str:
    with open(os.path.join(RESULTS, 'demo.json')) as f:
        d = json.load(f)
    return (f'```text\n{d["prints"]}\n```\n<small>`{d["command"]}` — {d["machine"]}; {d["versions"]}; {d["date"]}, '
            f'commit {d["commit"]}; {d["seconds"]} s.</small>')


def block_failures() -> str:
    with open(os.path.join(RESULTS, 'failure_scenarios.json')) as f:
        d = json.load(f)
    body = []
    for r in d['rows']:
        then = f'`{r["then"]}`: exit {r["then_exit_code"]}' if r.get('then') else ''
        body.append([r['scenario'], f'{r["exit_code"]}: `{r["user_sees"]}`', then, r['nothing_lost']])
    return (markdown_table(['what happens', 'exit code: what the user sees', 'then', 'what is kept'], body)
            + f'\n\n<small>Data: `results/failure_scenarios.json`. `{d["command"]}` (digits model, every scenario in '
              f'a fresh folder) — {d["machine"]}; {d["date"]}, commit {d["commit"]}.</small>')


def block_bits(model: str) -> str:
    rows = rows_of(f'bits_{model}')
    body = [[r['variant'], r['seeds'], f'{float(r["size_mb"]):.4f}', f'{float(r["mean_w_bits"]):.2f}',
             f'{float(r["bops_g"]):.4g}', f'{float(r["top1_mean"]):.2f} ± {float(r["top1_std"]):.2f}',
             r['search_s'] and f'{float(r["search_s"]):.1f} / {float(r["run_s"]):.0f}'] for r in rows]
    return markdown_table(['variant', 'seeds', 'weights MB', 'mean W bits', 'GBOPs', 'top-1', 'search s / run s'],
                          body) + '\n\n' + provenance(f'bits_{model}', rows)


def block_at_a_glance() -> str:
    """README's headline numbers, each from its data file."""
    rules = rows_of('grouping_rules')
    pick = lambda m, wa, g: next(r for r in rules if r['model'] == m and r['w_a'] == wa and r['grouping'] == g)  # noqa
    body = []
    for wa in ('2/4', '3/3'):
        for m in ('mobilenet_v2_small', 'resnet_small', 'regnetx_small'):
            plain, ours = pick(m, wa, 'QDrop'), pick(m, wa, 'MRECG recommended + QDrop')
            body.append([f'{m} W{wa[0]}A{wa[2]}', mean_std(plain), mean_std(ours)])
    return (markdown_table(['Fashion-MNIST, 3 seeds', 'QDrop', 'MRECG (default grouping) + QDrop'], body)
            + '\n\n' + provenance('grouping_rules', rules[:1]))


def block_groups() -> str:
    """The groups ModCap picks on the paper's four models (data-free, from the code): under the paper's rule with
    the paper's k, under the default config as a run resolves it (its own k), and the authors' hand-picked ones."""
    import mrecg
    from mrecg.config import PAPER_RULE
    from mrecg.grouping import PUBLISHED_SCHEMES
    body = []
    show = lambda groups: '; '.join(' + '.join(g) for g in groups)  # noqa: E731 (spaces: the cell can wrap)
    for name, k in (('resnet18', 2), ('resnet50', 4), ('regnetx_600m', 4), ('mobilenet_v2', 7)):
        model = mrecg.create_model(name)
        base = {'model': {'type': name}, 'data': {'type': 'imagenet'}, 'quantize': {'w_qconfig': {'bit': 2}}}
        paper = mrecg.plan(model, {**base, 'mrecg': {'metric': 'modcap', **PAPER_RULE, 'k': k}}).info
        default = mrecg.plan(model, base).info
        body.append([name, f'{k}: {show(paper.groups)}', f'{default.k}: {show(default.groups)}',
                     show(PUBLISHED_SCHEMES[name])])
    return (markdown_table(['model', "the paper's rule (its k: groups)", 'the default config (resolved k: groups)',
                            "the authors' (hand-picked from losses)"], body)
            + '\n\n<small>From the code: `mrecg plan` on each registry model (W2, data-free; the default config '
              'is what a run with only `model` and `data` gets), `scripts/gen_docs.py`.</small>')


def block_ci() -> str:
    with open(os.path.join(RESULTS, 'ci.json')) as f:
        d = json.load(f)
    tests, total = divmod(d['test_seconds'], 60), divmod(d['total_seconds'], 60)
    return (f'{d["passed"]} tests pass ({d["skipped"]} skipped) in {tests[0]} min {tests[1]} s; '
            f'the whole of CI, install included, {total[0]} min {total[1]} s.\n\n'
            f'<small>Data: `results/ci.json`. `{d["command"]}` — {d["machine"]}; {d["date"]}, commit {d["commit"]}; '
            f'recorded by `scripts/record_ci.py`.</small>')


def block_bits_targets(measure: str = 'fisher') -> str:
    """The issue's comparison: the searched allocation against uniform bits and a random allocation of the same size,
    per model and budget; 'beyond one std' against the larger of the two seed stds."""
    body = []
    for model, title in (('mbv2', 'MobileNetV2'), ('resnet', 'ResNet'), ('regnet', 'RegNetX')):
        if not os.path.isfile(os.path.join(RESULTS, f'bits_{model}.csv')):
            continue
        rows = {r['variant']: r for r in rows_of(f'bits_{model}')}
        for tag, uniform, label in (('size-w3', 'uniform_w3', 'size of uniform W3'),
                                    ('size-w2x1.1', 'uniform_w2', 'uniform W2 + 10 %')):
            ours, ref, rnd = rows[f'{measure}_{tag}'], rows[uniform], rows[f'random_{tag}']
            cells = [title, label, f'{float(ours["top1_mean"]):.2f} ± {float(ours["top1_std"]):.2f}']
            for other in (ref, rnd):
                diff = float(ours['top1_mean']) - float(other['top1_mean'])
                std = max(float(ours['top1_std']), float(other['top1_std']))
                cells += [f'{float(other["top1_mean"]):.2f} ± {float(other["top1_std"]):.2f}',
                          f'{diff:+.2f} ({"beyond" if diff > std else "within"} one std)']
            body.append(cells)
    return markdown_table(['model', 'budget', f'searched ({measure})', 'uniform', 'searched - uniform',
                           'random, same size', 'searched - random'], body) + \
        f'\n\n<small>From `results/bits_*.csv` (provenance there); "one std" is the larger seed std of the two.</small>'


def block_bits_summary() -> str:
    """Per model: the front table and its plot, from results/bits_*."""
    parts = []
    for model, title in (('mbv2', 'MobileNetV2 (small)'), ('resnet', 'ResNet (small)'), ('regnet', 'RegNetX (small)')):
        if not os.path.isfile(os.path.join(RESULTS, f'bits_{model}.csv')):
            continue
        parts += [f'### {title}', '', block_bits(model), '', f'![{title}](../img/bits_{model}.png)', '']
    return '\n'.join(parts) or 'Not measured yet.'


def block_grouping_plot(page: str, file: str = 'grouping_rules') -> str:
    """The default grouping against plain QDrop and the paper's rule: mean and std of every Fashion cell."""
    rows = rows_of(file)
    names = {'QDrop': 'QDrop', 'MRECG recommended + QDrop': 'MRECG default',
             'MRECG paper rule + QDrop': "MRECG paper's rule"}
    data = {'models': list(dict.fromkeys(r['model'] for r in rows)),
            'settings': list(dict.fromkeys(r['w_a'] for r in rows)), 'series': list(names.values()),
            'cells': {f'{r["model"]}|{r["w_a"]}|{names[r["grouping"]]}': [float(r['top1_mean']),
                                                                          float(r['top1_std'] or 0)]
                      for r in rows if r['grouping'] in names}}
    image = docs_plots.register('grouping_rules', data, docs_plots.draw_grouping, page,
                                'top-1 of plain QDrop, the default grouping and the paper rule per model and bits')
    return image + '\n\n' + provenance(file, rows[:1])


def gpu_rows():
    return [r for r in rows_of('speed_gpu_synthetic') if r.get('ours_ms_per_iteration_per_unit')]


def block_speed_plot(page: str) -> str:
    """Ours against MQBench per step, 224x224 synthetic: the CPU rows and the GPU rows, each with its date."""
    panels = []
    cpu = rows_of('speed_synthetic')
    by = {(r['model'], r['batch'], r['engine']): r for r in cpu}
    keys = [(m, b) for m, b, e in by if e == 'ours' and (m, b, 'MQBench') in by]
    panels.append({'title': f'{cpu[0]["machine"]}, measured {", ".join(sorted({r["date"] for r in cpu}))}',
                   'keys': keys, 'ms': {f'{m}|{b}': [float(by[(m, b, 'MQBench')]['ms_per_iteration_per_unit']),
                                                     float(by[(m, b, 'ours')]['ms_per_iteration_per_unit'])]
                                        for m, b in keys}})
    gpu = gpu_rows()
    if gpu:
        panels.append({'title': f'{gpu[0]["device"]}, {gpu[0]["engine"]}, measured '
                                f'{", ".join(sorted({r["date"] for r in gpu}))}',
                       'keys': [(r['model'], r['batch']) for r in gpu],
                       'ms': {f'{r["model"]}|{r["batch"]}': [float(r['mqbench_ms_per_iteration_per_unit']),
                                                             float(r['ours_ms_per_iteration_per_unit'])]
                              for r in gpu}})
    image = docs_plots.register('speed_per_step', {'panels': panels}, docs_plots.draw_speed, page,
                                'ms per iteration per unit, MQBench and ours, on the CPU and on the GPU')
    return (image + '\n\n<small>Data: `results/speed_synthetic.csv` and `results/speed_gpu_synthetic.csv` '
            '(commands and commits there and in the tables below); lower is faster.</small>')


DENSE_METRICS = {'miou': ('mIoU', 'mean IoU'), 'map': ('mAP', 'COCO mAP@[.5:.95]')}


def block_dense_plot(page: str, file: str, metric: str) -> str:
    """A dense-prediction benchmark: the metric per bit setting and method (mean ± std over seeds), the float
    network's as a line."""
    rows = rows_of(file)
    short, long = DENSE_METRICS[metric]
    fp = next(float(r[f'{metric}_mean']) for r in rows if r['method'] == 'Full Prec.')
    quant = [r for r in rows if r['method'] != 'Full Prec.']
    data = {'float': fp, 'settings': list(dict.fromkeys(r['w_a'] for r in quant)), 'metric': short,
            'series': list(dict.fromkeys(r['method'] for r in quant)),
            'cells': {f'{r["w_a"]}|{r["method"]}': [float(r[f'{metric}_mean']), float(r[f'{metric}_std'] or 0)]
                      for r in quant},
            'title': f'{rows[0]["model"]} backbone quantized, composed Fashion-MNIST canvases'}
    image = docs_plots.register(file, data, docs_plots.draw_dense, page,
                                f'{long} per bit setting for every method, the float network as a line')
    return image + '\n\n' + provenance(file, rows[:1])


PAPER_ITERATIONS = 20000  # per unit, the published setting


def block_paper_run() -> str:
    """How long the paper's run takes, per model, images per step and device, MQBench / ours, from the synthetic
    224x224 bench rows (dates in the headers). CPU cells are the bench's own projection (steps and cache
    passes); GPU cells are steps only: units x 20 000 x the measured ms per iteration per unit."""
    cpu, gpu = rows_of('speed_synthetic'), gpu_rows()
    family = lambda name: name.split(' ')[0]  # noqa: E731 ('MobileNetV2 ×1.0' in one file, 'MobileNetV2' in the other)
    units = {family(r['model']): int(r['units']) for r in cpu}
    cells = {}
    for r in cpu:
        cells.setdefault((family(r['model']), r['batch']), {}).setdefault('cpu', {})[r['engine']] = \
            r['projected_paper_run']
    for r in gpu:
        hours = lambda col: f'{units[r["model"]] * PAPER_ITERATIONS * float(r[col]) / 3.6e6:.1f} h'  # noqa: E731
        cells.setdefault((r['model'], r['batch']), {})['gpu'] = {
            'MQBench': hours('mqbench_ms_per_iteration_per_unit'), 'ours': hours('ours_ms_per_iteration_per_unit')}
    pair = lambda c: f'{c.get("MQBench", "-")} / {c.get("ours", "-")}' if c else 'not measured'  # noqa: E731
    body = [[model, batch, pair(c.get('cpu')), pair(c.get('gpu'))]
            for (model, batch), c in sorted(cells.items(), key=lambda kv: (int(kv[0][1]), list(units).index(kv[0][0])))]
    dates = lambda rows: ', '.join(sorted({r['date'] for r in rows}))  # noqa: E731
    return (markdown_table(['model', 'images per step', f'{cpu[0]["machine"]} (measured {dates(cpu)}): MQBench / ours',
                            f'{gpu[0]["device"]}, {gpu[0]["engine"]} (measured {dates(gpu)}), steps only: '
                            'MQBench / ours'], body)
            + '\n\n<small>Data: `results/speed_synthetic.csv`, `results/speed_gpu_synthetic.csv` (commands, '
              'machines and commits there); `mrecg bench --synthetic` times random 224x224 images, so these are '
              'times, never accuracy.</small>')


# ---- whole pages -------------------------------------------------------------------------------------------------
def config_page() -> str:
    from mrecg.config import Config, describe, section_hint
    lines = ['# Config reference', '',
             '<!-- generated by scripts/gen_docs.py from mrecg/config.py: edit the code, not this page -->', '',
             'Every key of `mrecg.Config`, as YAML writes it. A config file may extend others with `_base_:`; '
             '`--set key.path=value` overrides any key (values are YAML 1.2: `1e-3` is a number, `on` a string). '
             'A key not listed here is an error with a did-you-mean. **A config that writes only `model` and `data` '
             'gets these defaults**: MRECG with ModCap grouping (k = 3, log differences, the classifier never '
             'merged, a group gets its units\' iterations: the setting measured safe on three architectures) on top '
             'of QDrop, W4A4, 1024 calibration images, 32 per step, 20 000 iterations per unit (the published '
             'setting of BRECQ, QDrop and MRECG).', '']

    def section(cls, path: str) -> None:
        own = cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + '(')  # a dataclass's generated doc: none
        lines.extend([f'## `{path}`' if path else '## Top level', '',
                      ' '.join(cls.__doc__.split()) if own else '', ''])
        hints = typing.get_type_hints(cls)
        body, subs = [], []
        for f in fields(cls):
            hint, sub = hints[f.name], section_hint(hints[f.name])
            doc = f.metadata.get('doc', '')
            if not doc:
                raise SystemExit(f'config key {path}.{f.name} has no doc: add doc= in mrecg/config.py')
            check = f.metadata.get('check')
            rng = (check.__doc__ or '').strip() if check else ''
            default = f.default if f.default is not MISSING else f.default_factory()
            if sub is not None and typing.get_origin(hint) not in (list, typing.List):
                subs.append((sub, f'{path}.{f.name}' if path else f.name))
            shown = ('a section (below)' if sub is not None and default is None and typing.get_origin(hint) is None
                     else '`null`' if default is None else f'`{default}`' if isinstance(default, str)
                     else f'`{json.dumps(default)}`')
            body.append([f'`{f.name}`', describe(hint), shown, rng, doc])
        lines.extend([markdown_table(['key', 'type', 'default', 'range', 'what'], body), ''])
        for sub, sub_path in subs:
            section(sub, sub_path)

    section(Config, '')
    return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)) + '\n'


def cli_page() -> str:
    os.environ['COLUMNS'] = '96'  # argparse wraps to the terminal: a fixed width keeps the page stable
    from mrecg.commands import COMMANDS, command_parser
    lines = ['# Command reference', '',
             '<!-- generated by scripts/gen_docs.py from the argument parsers: edit the code, not this page -->', '',
             '`pip install` gives one command, `mrecg`, with the subcommands below (`python -m mrecg` is the same); '
             '`python ptq_main.py` and `mrecg-ptq` are `mrecg quantize`. Exit codes: 0 done, 2 bad input (one '
             'line on stderr), 130 interrupted (resumable), 1 an internal error or a lost process of a '
             'data-parallel run (resumable).', '']
    for name, (_, _, _, summary) in COMMANDS.items():
        help_text = command_parser(name).format_help().rstrip()
        lines += [f'## `mrecg {name}`', '', summary[0].upper() + summary[1:] + '.', '', '```text', help_text, '```', '']
    return '\n'.join(lines)


def models_page() -> str:
    import mrecg
    from mrecg.zoo import model_entry
    lines = ['# Models', '',
             '<!-- generated by scripts/gen_docs.py from the registry and results/model_coverage.csv -->', '',
             '## The registry', '', '`model.type: <name>` (or `mrecg.create_model(name)`); parameter names as in the '
             'published checkpoints, which load by name.', '']
    body = []
    for name in mrecg.list_models():
        entry = model_entry(name)
        body.append([f'`{name}`', entry.family, entry.image_size])
    lines += [markdown_table(['name', 'family', 'designed input size'], body), '']
    lines += ['## Checkpoints of the small models', '', 'Committed in `models/checkpoints/` (except ResNet-18 on '
              'Fashion-MNIST, 45 MB), trained by `scripts/train_small_models.py` (seeded).', '',
              block_table('checkpoints', 'checkpoint,data,float_top1,committed', '',
                          'checkpoint,data,float top-1,committed'), '']
    lines += ['## Any torchvision or timm model', '', '`model.type: torchvision:<name>` (built with `weights=None`) '
              'or `timm:<name>` (`pretrained=False`): nothing is downloaded, `model.path` gives the weights. Which '
              'ones trace, how the graph rule cuts them into units, and which export to ONNX (a smoke '
              'quantization on 16 random 3x96x96 images, 1 iteration per unit; not an accuracy):', '',
              block_table('model_coverage', '', '', 'model,traced,base units,largest unit (conv/linear layers),'
                                                    'plan s,ONNX export'), '']
    return '\n'.join(lines)


PAGES = {'docs/reference/config.md': config_page, 'docs/reference/cli.md': cli_page,
         'docs/reference/models.md': models_page}
BLOCKS = {'table': block_table, 'pivot': block_pivot, 'demo': block_demo, 'failures': block_failures,
          'bits': block_bits, 'at_a_glance': block_at_a_glance, 'groups': block_groups, 'ci': block_ci,
          'bits_summary': block_bits_summary, 'bits_targets': block_bits_targets,
          'grouping_plot': block_grouping_plot, 'speed_plot': block_speed_plot, 'paper_run': block_paper_run,
          'dense_plot': block_dense_plot}


def block_arguments(text: str) -> Dict[str, str]:
    """A block's ``key=value`` arguments, on one line or one per line; a value with spaces or commas in a header
    is quoted (``headers="top-1 ours,GPU memory"``). Shell-style quoting, so nothing is cut at a space."""
    args = {}
    for word in shlex.split(text):
        key, eq, value = word.partition('=')
        if not eq or not key.isidentifier():
            raise ValueError(f'block argument {word!r} is not key=value (quote a value that has spaces)')
        if key in args:
            raise ValueError(f'block argument {key} given twice')
        args[key] = value
    return args


def render_blocks(text: str, where: str = '') -> str:
    def one(m):
        name = m.group('name')
        if name not in BLOCKS:
            raise SystemExit(f'{where}: no generated block named {name} (known: {", ".join(BLOCKS)})')
        args = block_arguments(m.group('args'))
        if 'page' in inspect.signature(BLOCKS[name]).parameters:
            args['page'] = os.path.join(ROOT, where)  # a plot's image path is relative to its page
        try:
            body = BLOCKS[name](**args)
        except (TypeError, ValueError, KeyError) as exc:
            raise SystemExit(f'{where}: block {name}: {exc}') from None
        return m.group(1) + body.rstrip() + '\n' + m.group(5)
    return BLOCK.sub(one, text)


def documents() -> List[str]:
    docs = [os.path.join(ROOT, 'README.md')]
    for folder, _, files in os.walk(os.path.join(ROOT, 'docs')):
        docs += [os.path.join(folder, f) for f in sorted(files) if f.endswith('.md')]
    return docs


def generate() -> Dict[str, str]:
    """Every generated file's expected content, by path."""
    out = {os.path.join(ROOT, path): make() for path, make in PAGES.items()}
    for path in documents():
        if path in out:
            continue
        with open(path) as f:
            text = f.read()
        if '<!-- generated:' in text:
            out[path] = render_blocks(text, os.path.relpath(path, ROOT))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--check', action='store_true', help='compare only; exit 1 naming the stale files')
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    stale = []
    for path, text in generate().items():
        current = open(path).read() if os.path.isfile(path) else None
        if current != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, 'w') as f:
                    f.write(text)
    plots = docs_plots.stale()
    stale += [os.path.relpath(p.path, ROOT) for p in plots]
    if plots and not args.check:
        docs_plots.draw_all(plots)
    if args.check and stale:
        print('stale generated docs (run python scripts/gen_docs.py): ' + ', '.join(stale), file=sys.stderr)
        return 1
    print(('would update: ' if args.check else 'updated: ') + (', '.join(stale) or 'nothing'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
