"""The docs' plots, drawn from the results files like the tables (issue 32): where a reader compares, a picture.

Each plot is a PNG under ``docs/img/plots/``; ``docs/img/plots/digests.json`` holds, per plot, a digest of the rows
it was drawn from and of the function that drew it, so ``gen_docs.py --check`` finds a stale plot without
comparing image bytes (those differ between matplotlib versions for the same data).
"""
import hashlib
import inspect
import json
import os
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, 'docs', 'img', 'plots')
DIGESTS = os.path.join(FOLDER, 'digests.json')
COLOURS = {'QDrop': '#7f7f7f', 'MRECG default': '#1f77b4', "MRECG paper's rule": '#ff7f0e',
           'MQBench': '#7f7f7f', 'ours': '#1f77b4'}


class Plot:
    def __init__(self, name: str, data, draw: Callable):
        self.name, self.data, self.draw = name, data, draw
        self.path = os.path.join(FOLDER, name + '.png')
        text = json.dumps(data, sort_keys=True) + inspect.getsource(draw)
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]


PENDING: Dict[str, Plot] = {}


def register(name: str, data, draw: Callable, page: str, alt: str) -> str:
    """Queue a plot for drawing and return its Markdown image line, relative to ``page``."""
    plot = Plot(name, data, draw)
    PENDING[name] = plot
    return f'![{alt}]({os.path.relpath(plot.path, os.path.dirname(page))})'


def stale() -> List[Plot]:
    known = json.load(open(DIGESTS)) if os.path.isfile(DIGESTS) else {}
    return [p for p in PENDING.values() if known.get(p.name) != p.digest or not os.path.isfile(p.path)]


def draw_all(plots: List[Plot]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(FOLDER, exist_ok=True)
    known = json.load(open(DIGESTS)) if os.path.isfile(DIGESTS) else {}
    for plot in plots:
        fig = plot.draw(plt, plot.data)
        fig.savefig(plot.path, dpi=100, bbox_inches='tight', metadata={'Software': None})
        plt.close(fig)
        known[plot.name] = plot.digest
    with open(DIGESTS, 'w') as f:
        json.dump(dict(sorted(known.items())), f, indent=1)
        f.write('\n')


# ---- the plots -------------------------------------------------------------------------------------------------
def draw_grouping(plt, data):
    """One panel per model: top-1 per bit setting for plain QDrop, the default grouping and the paper's rule."""
    models, settings, series = data['models'], data['settings'], data['series']
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), sharey=False)
    width = 0.8 / len(series)
    for ax, model in zip(axes, models):
        lows = []
        for i, name in enumerate(series):
            cells = [data['cells'].get(f'{model}|{s}|{name}') for s in settings]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(settings))]
            means = [c[0] if c else 0 for c in cells]
            stds = [c[1] if c else 0 for c in cells]
            lows += [m - s for m, s in zip(means, stds) if m]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=name, color=COLOURS.get(name))
        ax.set_xticks(range(len(settings)), [f'W{s[0]}A{s[2]}' for s in settings])
        ax.set_ylim(max(0, min(lows) - 5), 100)
        ax.set_title(model)
        ax.set_xlabel('bit setting')
        ax.grid(axis='y', alpha=0.3)
    axes[0].set_ylabel('top-1 % (Fashion-MNIST test)\nmean ± std over 3 seeds')
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='upper center', ncol=len(series), fontsize=9, frameon=False)
    return fig


def draw_dense(plt, data):
    """Metric bars per bit setting, one per method, with the seeds' std; the float network's as a line."""
    settings, series = data['settings'], data['series']
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    width = 0.8 / len(series)
    lows = [data['float']]
    palette = ['#bcbd22', '#7f7f7f', '#1f77b4', '#d62728', '#9467bd', '#8c564b']
    for i, name in enumerate(series):
        cells = [data['cells'].get(f'{s}|{name}') for s in settings]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(settings))]
        means, stds = [c[0] if c else 0 for c in cells], [c[1] if c else 0 for c in cells]
        lows += [m - s for m, s in zip(means, stds) if m]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name, color=palette[i % len(palette)])
    ax.axhline(data['float'], color='black', linestyle='--', linewidth=1, label=f'float ({data["float"]:.2f})')
    ax.set_xticks(range(len(settings)), [f'W{s.split("/")[0]}A{s.split("/")[1]}' for s in settings])
    ax.set_ylim(max(0, min(lows) - 3), data['float'] + 2)
    ax.set_ylabel(f'{data["metric"]} % (val canvases)\nmean ± std over seeds')
    ax.set_title(data['title'], fontsize=10)
    ax.grid(axis='y', alpha=0.3)
    ax.legend(fontsize=8, ncol=len(series) + 1, loc='upper center', bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    return fig


def draw_speed(plt, data):
    """ms per iteration per unit, MQBench beside ours, per model and images per step, one panel per device; the
    ratio MQBench / ours over each pair (above 1: ours is faster)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    short = {'MobileNetV2 ×1.0': 'MobileNetV2', 'RegNetX-600MF': 'RegNetX'}
    fig, axes = plt.subplots(1, len(data['panels']), figsize=(6.5 * len(data['panels']), 4.0))
    for ax, panel in zip(axes, data['panels']):
        keys = sorted(panel['keys'], key=lambda k: int(k[1]))
        labels = [f'{short.get(m, m)}\n{b}/step' for m, b in keys]
        pairs = [panel['ms'][f'{m}|{b}'] for m, b in keys]
        for i, engine in enumerate(('MQBench', 'ours')):
            ax.bar([x + (i - 0.5) * 0.4 for x in range(len(keys))], [p[i] for p in pairs], 0.4, label=engine,
                   color=COLOURS[engine])
        for x, (q, o) in enumerate(pairs):
            ax.annotate(f'{q / o:.2f}×', (x, max(q, o)), textcoords='offset points', xytext=(0, 3), ha='center',
                        fontsize=8)
        ax.set_yscale('log')
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(top=ax.get_ylim()[1] * 1.6)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel('ms per iteration per unit (log scale)')
        ax.set_title(panel['title'], fontsize=10)
        ax.grid(axis='y', alpha=0.3)
        ax.legend(fontsize=8, loc='upper left')
    fig.tight_layout()
    return fig
