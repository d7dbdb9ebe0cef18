"""The documentation cannot drift from the code (issue 25): generated pages are current, the site builds
strictly, every command and --set in README and docs parses against the real parsers and configs, every YAML
block is a valid config, every Python block runs (at tiny settings where the page's are a GPU run)."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mrecg.commands import COMMANDS, command_parser
from mrecg.config import Config, load_config, parse_yaml

PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'), recursive=True))
GENERATED = ('reference/config.md', 'reference/cli.md', 'reference/models.md')


def blocks(language):
    """(page, index, text) of every fenced block in that language, outside the generated reference pages."""
    for page in PAGES:
        if page.endswith(GENERATED):
            continue
        text = open(page).read()
        for i, m in enumerate(re.finditer(rf'^```{language}\n(.*?)^```', text, re.S | re.M)):
            yield os.path.relpath(page, ROOT), i, m.group(1)


def commands(script):
    """Every command line of a bash block: continuations joined, comments dropped, split at && and ;."""
    for line in script.replace('\\\n', ' ').splitlines():
        line = line.split(' #')[0].strip()
        for part in re.split(r'&&|;', line):
            if part.strip():
                yield shlex.split(part.strip())


def as_mrecg(words):
    """(subcommand, its arguments) when the words run the toolkit, else None."""
    for i, w in enumerate(words):
        base = os.path.basename(w)
        if base in ('ptq_main.py', 'mrecg-ptq'):
            rest = words[i + 1:]
            return ('plan' if '--plan' in rest else 'quantize'), [a for a in rest if a != '--plan']
        if base == 'mrecg' or (w == '-m' and i + 1 < len(words) and words[i + 1] == 'mrecg'):
            rest = words[i + (2 if w == '-m' else 1):]
            if not rest or rest[0].startswith('-'):
                return None
            name = ' '.join(rest[:2]) if rest[0] == 'study' else rest[0]
            return name, rest[len(name.split()):]
    return None


def toolkit_commands():
    for page, i, script in blocks('bash'):
        for words in commands(script):
            found = as_mrecg(words)
            if found:
                yield page, found


def test_generated_docs_are_current():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'gen_docs.py'), '--check'], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The docs site, built once, strictly (a warning fails the build)."""
    folder = tmp_path_factory.mktemp('site') / 'site'
    mkdocs = os.path.join(os.path.dirname(sys.executable), 'mkdocs')
    proc = subprocess.run([mkdocs, 'build', '--strict', '-d', str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, NO_MKDOCS_2_WARNING='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_the_site_builds_strictly(site):
    assert os.path.isfile(site / 'reference' / 'api' / 'index.html')
    api = re.sub(r'<[^>]+>', '', open(site / 'reference' / 'api' / 'index.html').read())
    for field in ('unit_losses', 'List[Optional[float]]', 'quantize', 'judge_export'):
        assert field in api, f'the API reference does not show {field}'
    assert '<math' in open(site / 'concepts' / 'grouping' / 'index.html').read()  # the formula is maths, offline


def table_rows(text):
    """Every pipe table of a Markdown text outside fenced code: lists of cell counts (header first), with the
    line number. A pipe inside a code span splits a cell too (GFM), unless escaped."""
    text = re.sub(r'^```.*?^```', lambda m: '\n' * m.group(0).count('\n'), text, flags=re.S | re.M)
    tables, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith('|'):
            cells = re.split(r'(?<!\\)\|', line.strip().strip('|'))
            if current is None:
                current = (number, [])
                tables.append(current)
            if not re.fullmatch(r'\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*', line.strip()):
                current[1].append(len(cells))
            else:
                current[1].append(('separator', len(cells)))
        else:
            current = None
    return tables


def test_every_markdown_table_has_as_many_cells_in_each_row_as_in_its_header():
    for page in PAGES:
        for line, rows in table_rows(open(page).read()):
            where = f'{os.path.relpath(page, ROOT)}:{line}'
            assert len(rows) >= 2 and isinstance(rows[1], tuple), f'{where}: a table without a separator row'
            header = rows[0]
            assert rows[1][1] == header, f'{where}: {header} headers, {rows[1][1]} separator cells'
            bad = [i for i, n in enumerate(rows[2:]) if n != header]
            assert not bad, f'{where}: rows {bad[:5]} do not have {header} cells'


def header_texts(html):
    """The header cells of every table in built HTML, as plain text."""
    import html as html_lib
    heads = []
    for thead in re.findall(r'<thead>(.*?)</thead>', html, re.S):
        cells = re.findall(r'<th[^>]*>(.*?)</th>', thead, re.S)
        heads.append([html_lib.unescape(re.sub(r'<[^>]+>', '', c)).strip() for c in cells])
    return heads


def test_every_generated_table_shows_all_its_columns_in_the_built_site(site):
    """The header the generator wrote (one name per data column) is the header the browser gets: no column lost."""
    block = re.compile(r'<!-- generated: (table|pivot|groups|bits|paper_run|at_a_glance|failures)[^>]*-->\n(.*?)'
                       r'<!-- end generated -->', re.S)
    checked = 0
    for page in PAGES:
        rel = os.path.relpath(page, os.path.join(ROOT, 'docs'))
        if page.endswith('README.md'):
            continue
        built = open(site / (rel[:-3].replace('index', '') + '/index.html').lstrip('/')).read() \
            if not rel.endswith('index.md') else open(site / 'index.html').read()
        heads = header_texts(built)
        for m in block.finditer(open(page).read()):
            first = next(line for line in m.group(2).splitlines() if line.startswith('|'))
            expected = [c.strip().replace('`', '').replace('\\|', '|')
                        for c in re.split(r'(?<!\\)\|', first.strip().strip('|'))]
            assert expected in heads, f'{rel}: the built page has no table headed {expected}'
            checked += 1
    assert checked >= 20


def test_every_image_in_docs_is_shown_and_every_shown_image_exists():
    text = '\n'.join(open(p).read() for p in PAGES)
    shown = set(re.findall(r'!\[[^\]]*\]\(([^)]+\.png)\)', text))
    names = {os.path.basename(s) for s in shown}
    files = [f for f in glob.glob(os.path.join(ROOT, 'docs', 'img', '**', '*.png'), recursive=True)]
    unused = [os.path.relpath(f, ROOT) for f in files if os.path.basename(f) not in names]
    assert not unused, f'images no page shows (remove them or show them): {unused}'


def test_the_site_in_a_real_browser(site):
    """Headless Chromium over the built site on 127.0.0.1: no console error, every image drawn, no table wider
    than the column, nothing fetched from another host, no sideways scroll at 400 px, search finds imagenet.
    CI installs Debian's chromium and chromium-driver; elsewhere the test skips without them."""
    have = all(os.path.isfile(p) for p in ('/usr/bin/chromium', '/usr/bin/chromedriver'))
    try:
        import selenium  # noqa: F401
    except ImportError:
        have = False
    if not have:
        if os.environ.get('CI'):
            pytest.fail('CI must install chromium, chromium-driver (.ci/run) and selenium (requirements.txt)')
        pytest.skip('no chromium / chromedriver / selenium here')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'check_site.py'), str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_command_of_the_docs_parses_and_its_overrides_load():
    found = list(toolkit_commands())
    assert len(found) > 30 and {name for _, (name, _) in found} >= {'quantize', 'plan', 'export', 'sweep', 'collect',
                                                                     'bits', 'study schemes', 'study ablation', 'bench'}
    for page, (name, args) in found:
        assert name in COMMANDS, f'{page}: mrecg {name} is not a command'
        try:
            parsed = command_parser(name).parse_args(args)
        except SystemExit:
            pytest.fail(f'{page}: mrecg {name} {" ".join(args)} does not parse')
        sets = list(getattr(parsed, 'set', None) or [])
        configs = getattr(parsed, 'configs', None) or [getattr(parsed, 'config', None)]
        variants = [v[1:] for v in getattr(parsed, 'variant', None) or []]
        for config in configs:
            if config and os.path.isfile(os.path.join(ROOT, config)):
                for extra in [[]] + variants:
                    load_config(os.path.join(ROOT, config), [*sets, *extra])  # keys and values checked


def test_every_yaml_block_is_a_valid_config():
    found = list(blocks('yaml'))
    assert len(found) >= 3
    for page, i, text in found:
        Config.from_dict(parse_yaml(text))


@pytest.fixture(scope='module')
def tiny_inputs(tmp_path_factory):
    """What the GPU-sized examples read, at toy size: an ImageFolder, a ResNet-18 state dict, an ONNX file."""
    import torchvision
    from PIL import Image
    folder = tmp_path_factory.mktemp('docs_inputs')
    gen = torch.Generator().manual_seed(0)
    for split in ('train', 'val'):
        for label in ('a', 'b'):
            os.makedirs(folder / 'data' / split / label)
            for j in range(8):
                pixels = (torch.rand(40, 40, 3, generator=gen) * 255).byte().numpy()
                Image.fromarray(pixels).save(folder / 'data' / split / label / f'{j}.png')
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), folder / 'resnet18.pth')
    import mrecg
    model = mrecg.create_model('mobilenet_v2_small', {'stem_stride': 2})
    result = mrecg.quantize(model, torch.randn(16, 1, 28, 28), {'data': {'batch_size': 16}, 'quantize': {
        'cali_size': 16, 'reconstruction': {'enabled': False}}, 'mrecg': {'metric': 'none'}})
    os.makedirs(folder / 'outputs' / 'mbv2_w2a4')
    mrecg.export_onnx(result.model, str(folder / 'outputs' / 'mbv2_w2a4' / 'model.onnx'), torch.zeros(1, 1, 28, 28))
    return folder


# The examples whose real settings are a GPU run on ImageNet-sized images, at toy size (the rest run as written)
TINY = [("'cali_size': 1024}}", "'cali_size': 16, 'reconstruction': {'iterations': 2, 'batch_size': 8}}}"),
        ("device='cuda'", "device='cpu'"), ('T.Resize(256), T.CenterCrop(224)', 'T.Resize(36), T.CenterCrop(32)'),
        ('torch.zeros(1, 3, 224, 224)', 'torch.zeros(1, 3, 32, 32)'), ("'iterations': 200", "'iterations': 5"),
        ("'iterations': 100}", "'iterations': 5}"), ("'cali_size': 512", "'cali_size': 64"),
        ("'cali_size': 256", "'cali_size': 64")]


@pytest.mark.parametrize('page,index,code', list(blocks('python')), ids=lambda v: str(v)[:40])
def test_every_python_block_runs(page, index, code, tiny_inputs):
    for old, new in TINY:
        code = code.replace(old, new)
    for name in ('data/train', 'data/val', 'resnet18.pth', 'outputs/mbv2_w2a4/model.onnx'):
        code = code.replace(f"'{name}'", repr(str(tiny_inputs / name)))
    work = tiny_inputs / f'run_{index}_{os.path.basename(page)}'  # files the example writes land here, not in the repo
    os.makedirs(work, exist_ok=True)
    for shared in ('models', 'configs'):
        if not os.path.exists(work / shared):
            os.symlink(os.path.join(ROOT, shared), work / shared)
    proc = subprocess.run([sys.executable, '-c', code], cwd=work, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='2'))
    assert proc.returncode == 0, f'{page} block {index}:\n{proc.stderr[-2000:]}'


def test_no_provenance_caption_prints_a_placeholder():
    for page in PAGES:
        for caption in re.findall(r'<small>(.*?)</small>', open(page).read(), re.S):
            assert not re.search(r'(; -[;.]|commit -\.|— -;|: -\.)', caption), f'{page}: {caption[:200]}'
