#!/usr/bin/env python
"""Look at the built docs site in a real browser, as a user would (issue 32), and say what is wrong.

    mkdocs build --strict -d site && python scripts/check_site.py site [--screenshots shots/]

Serves the folder on 127.0.0.1 and opens every page in headless Chromium (Debian's ``chromium`` and
``chromium-driver``; nothing is downloaded) through selenium. A page fails when the browser logs a console error,
an image has no natural size, a table or code block is wider than the content column without a scroll container
around it or a table needs to scroll sideways (at 1400 px), the page fetches anything from another host (it must
work served from a laptop without internet), or the page itself scrolls sideways (at 400 px). The site's search must find "imagenet".
Exit 1 names every problem, one per line; exit 0 prints the pages checked and the seconds taken.
"""
import argparse
import functools
import http.server
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import List

CHROMIUM = ('/usr/bin/chromium', '/usr/bin/chromium-browser')
DRIVER = ('/usr/bin/chromedriver',)
# Chromium on a closed network: no background connections, no first-run, no sandbox (CI runs as root)
FLAGS = ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage', '--hide-scrollbars')

# One script per page: what a reader would see go wrong. Returns a list of strings.
LAYOUT_JS = r"""
const problems = [];
const content = document.querySelector('.md-content__inner') || document.body;
const right = content.getBoundingClientRect().right + 1;
function scrolls(el) {
  for (let p = el.parentElement; p && p !== content.parentElement; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX;
    if ((o === 'auto' || o === 'scroll') && p.getBoundingClientRect().right <= right) return true;
  }
  return false;
}
for (const img of document.images) {
  if (!img.complete || img.naturalWidth === 0) problems.push('image without a natural size: ' + img.getAttribute('src'));
}
for (const el of content.querySelectorAll('table, pre')) {
  const own = getComputedStyle(el).overflowX;
  const contained = own === 'auto' || own === 'scroll';
  const text = el.textContent.trim().replace(/\s+/g, ' ').slice(0, 60);
  if (el.getBoundingClientRect().right > right && !contained && !scrolls(el)) {
    problems.push(el.tagName.toLowerCase() + ' wider than the content without a scroll container: ' + text);
  } else if (el.tagName === 'TABLE' && el.getBoundingClientRect().right > right) {
    problems.push('table wider than the content column (hidden columns scroll sideways): ' + text);
  }
}
for (const r of performance.getEntriesByType('resource')) {
  if (!r.name.startsWith(location.origin)) problems.push('fetches from another host (fails offline): ' + r.name);
}
return problems;
"""
SIDEWAYS_JS = "return [document.documentElement.scrollWidth, window.innerWidth];"


def site_pages(site: str) -> List[str]:
    """Every page of the built site, as a path under the server root (``index.html`` files, 404 left out)."""
    pages = []
    for folder, _, files in os.walk(site):
        if 'index.html' in files and not os.path.relpath(folder, site).startswith(('assets', 'search')):
            rel = os.path.relpath(folder, site)
            pages.append('' if rel == '.' else rel.replace(os.sep, '/') + '/')
    return sorted(pages)


def serve(site: str):
    """A quiet static server on 127.0.0.1 at a free port; returns (server, base URL)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f'http://127.0.0.1:{server.server_address[1]}/'


def find(paths) -> str:
    return next((p for p in paths if os.path.isfile(p)), '')


def browser(width: int, profile: str):
    """Headless Chromium at ``width`` x 1000 px with its console log readable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = find(CHROMIUM)
    for flag in FLAGS + (f'--window-size={width},1000', f'--user-data-dir={profile}'):
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(find(DRIVER)), options=options)
    # the window has a minimum width (about 500 px); the viewport is set exactly, as a phone's would be
    driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride',
                           {'width': width, 'height': 1000, 'deviceScaleFactor': 1, 'mobile': width < 600})
    return driver


def console_errors(driver) -> List[str]:
    return [e['message'] for e in driver.get_log('browser') if e['level'] == 'SEVERE']


def check_pages(driver, base: str, pages: List[str], shots: str, width: int) -> List[str]:
    problems = []
    for page in pages:
        driver.get(base + page)
        name = page.rstrip('/') or 'home'
        problems += [f'{name} ({width} px): console error: {m}' for m in console_errors(driver)]
        if width >= 1000:
            problems += [f'{name} ({width} px): {p}' for p in driver.execute_script(LAYOUT_JS)]
        else:
            wide, window = driver.execute_script(SIDEWAYS_JS)
            if wide > window + 1:
                problems.append(f'{name} ({width} px): the page scrolls sideways ({wide} px wide in {window})')
        if shots:
            driver.save_screenshot(os.path.join(shots, f'{name.replace("/", "_")}_{width}.png'))
    return problems


def check_search(driver, base: str, word: str = 'imagenet') -> List[str]:
    """Type ``word`` into the site's search box and wait for results (the search index is built in a worker)."""
    from selenium.webdriver.common.by import By
    driver.get(base)
    box = driver.find_element(By.CSS_SELECTOR, 'input.md-search__input')
    box.click()
    box.send_keys(word)
    deadline = time.time() + 20
    while time.time() < deadline:
        hits = driver.find_elements(By.CSS_SELECTOR, '.md-search-result__item')
        if hits:
            return []
        time.sleep(0.25)
    return [f'search for "{word}" found nothing in 20 s']


def check_site(site: str, shots: str = '', widths=(1400, 400)) -> List[str]:
    """Every problem a reader of the site would see, one line each (empty: none)."""
    if not find(CHROMIUM) or not find(DRIVER):
        raise SystemExit('no chromium/chromedriver: apt-get install -y chromium chromium-driver')
    pages = site_pages(site)
    server, base = serve(site)
    problems = []
    try:
        for width in widths:
            profile = tempfile.mkdtemp(prefix='mrecg-chromium-')
            driver = browser(width, profile)
            try:
                problems += check_pages(driver, base, pages, shots, width)
                if width == widths[0]:
                    problems += check_search(driver, base)
            finally:
                driver.quit()
                shutil.rmtree(profile, ignore_errors=True)
    finally:
        server.shutdown()
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('site', help='the folder mkdocs built')
    p.add_argument('--screenshots', default='', help='write one PNG per page and width here')
    args = p.parse_args(argv)
    if args.screenshots:
        os.makedirs(args.screenshots, exist_ok=True)
    start = time.time()
    problems = check_site(args.site, args.screenshots)
    for line in problems:
        print(line)
    print(f'{len(site_pages(args.site))} pages at 1400 and 400 px, {len(problems)} problem(s), '
          f'{time.time() - start:.0f} s', file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
