"""A mkdocs hook: ``$$ ... $$`` blocks (TeX, on lines of their own) become MathML when the site is built.

Why at build time: the site must work served from a laptop without internet, and browsers render MathML
themselves, so no MathJax or KaTeX is fetched from a CDN nor bundled. Named in mkdocs.yml under ``hooks``."""
import re

from latex2mathml.converter import convert

DISPLAY = re.compile(r'^\$\$\n(?P<tex>.+?)\n\$\$$', re.S | re.M)
FENCE = re.compile(r'^```.*?^```', re.S | re.M)


def tex_to_html(tex: str) -> str:
    return f'<div class="maths" markdown="0">{convert(" ".join(tex.split()), display="block")}</div>'


def on_page_markdown(markdown: str, **_) -> str:
    """Every display block outside fenced code, converted; code blocks are left as written."""
    parts, last = [], 0
    for fence in FENCE.finditer(markdown):
        parts.append(DISPLAY.sub(lambda m: tex_to_html(m.group('tex')), markdown[last:fence.start()]))
        parts.append(fence.group(0))
        last = fence.end()
    parts.append(DISPLAY.sub(lambda m: tex_to_html(m.group('tex')), markdown[last:]))
    return ''.join(parts)
