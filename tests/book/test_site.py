"""The published site, served on loopback under a sub-path: an HTTP crawl, then a real browser (Chromium).

Both use the one small build of the session (``small_site`` in conftest.py). The
browser is Debian's Chromium driven by Playwright (``.ci/run`` installs it with apt);
screenshots of every chapter page go to ``_build/screenshots``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import pytest

from embgeo_utils.book import launch, publish, results, runner
from embgeo_utils.chapters import claims, interactive
from embgeo_utils.core import stats

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/embgeo/"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "_build" / "screenshots"

pytestmark = pytest.mark.slow


class _SubPathHandler(SimpleHTTPRequestHandler):
    """Serves the site folder under PREFIX only, as GitHub Pages serves a project site."""

    def translate_path(self, path: str) -> str:
        path = urlsplit(path).path
        if not path.startswith(PREFIX):
            return str(Path(self.directory) / "_not_under_the_sub_path")  # a missing file: 404
        return super().translate_path("/" + path[len(PREFIX) :])

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="session")
def site_url(small_site) -> Iterator[str]:
    """Base URL of the small site served on 127.0.0.1 under PREFIX."""
    handler = functools.partial(_SubPathHandler, directory=str(small_site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"
    finally:
        server.shutdown()
        server.server_close()


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("href", "src") and v]
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            found = re.search(r"url=(\S+)", a.get("content") or "", flags=re.I)
            self.refs += [found.group(1).strip("'\"")] if found else []


def site_pages(folder: Path) -> list[str]:
    """The site's pages, relative to it (the theme's templates in _static/ are not pages)."""
    found = (p.relative_to(folder) for p in folder.rglob("*.html"))
    return sorted(p.as_posix() for p in found if p.parts[0] not in ("_static", "_sources"))


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


def crawl(base: str) -> tuple[dict[str, int], dict[str, set[str]], list[str]]:
    """Follow every local link from the start page: status per URL, ids per page, and broken anchors."""
    status: dict[str, int] = {}
    ids: dict[str, set[str]] = {}
    anchors: list[tuple[str, str, str]] = []
    todo = [base, base + "index.html"]  # the sub-path itself answers with index.html, as on GitHub Pages
    while todo:
        url = todo.pop()
        if url in status:
            continue
        code, body, kind = _get(url)
        status[url] = code
        refs: list[str] = []
        if code == 200 and kind == "text/html":
            parser = _Refs()
            parser.feed(body.decode("utf-8", errors="replace"))
            refs, ids[url] = parser.refs, parser.ids
        elif code == 200 and kind == "text/css":
            refs = re.findall(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)", body.decode("utf-8", errors="replace"))
        for ref in refs:
            target, fragment = urldefrag(urljoin(url, ref))
            if not target.startswith(base.split(PREFIX)[0]) or target.startswith("data:"):
                continue
            todo.append(target)
            if fragment:
                anchors.append((url, target, unquote(fragment)))
    broken = [f"{page} -> {target}#{frag}" for page, target, frag in anchors if frag not in ids.get(target, {frag})]
    return status, ids, broken


def test_every_page_and_asset_answers_200_under_the_sub_path(site_url, small_site):
    status, ids, broken_anchors = crawl(site_url)
    bad = {url: code for url, code in status.items() if code != 200}
    assert not bad, f"{len(bad)} of {len(status)} URLs fail: {sorted(bad.items())[:20]}"
    assert not broken_anchors, broken_anchors[:20]
    pages = set(site_pages(small_site))
    reached = {u[len(site_url) :] for u in status if u.endswith(".html")}
    assert {f"_executed/{p.stem}.html" for p in runner.chapter_sources(ROOT)} <= reached
    assert pages - reached <= {"genindex.html"}, f"pages no link reaches: {sorted(pages - reached)}"
    assert any(u.endswith(".css") for u in status) and any("/_static/" in u for u in status)
    assert (small_site / ".nojekyll").is_file()
    assert _get(site_url.split(PREFIX)[0] + "/index.html")[0] == 404  # nothing is served above the sub-path


def test_chapter_pages_show_their_parameters_once_and_hide_the_parameter_cells(site_url):
    for stem in [p.stem for p in runner.chapter_sources(ROOT)] + ["ledger"]:
        html = _get(f"{site_url}_executed/{stem}.html")[1].decode()
        assert "tag_parameters" not in html and "tag_injected-parameters" not in html, stem  # Jupyter Book tag classes
        assert html.count("Parameters of this run") == 1, stem


_FIGURE = re.compile(
    rf'<div class="{interactive.HTML_CLASS}"[^>]*>.*?<script type="application/json">(.*?)</script></div>', re.S
)


def test_interactive_figures_stay_within_the_page_budget_and_plotly_is_served_once_from_the_site(small_site):
    copies = sorted(p.relative_to(small_site).as_posix() for p in small_site.rglob(publish.PLOTLY_JS))
    assert copies == [f"_static/{publish.PLOTLY_JS}"], copies
    with_figures = set()
    for rel in site_pages(small_site):
        html = (small_site / rel).read_text()
        assert "plotly.js v" not in html, f"{rel} embeds plotly.js instead of linking the site's copy"
        figures = _FIGURE.findall(html)
        loads = re.findall(r'<script[^>]*src="([^"]*plotly\.min\.js[^"]*)"', html)
        if not figures:
            assert not loads, f"{rel} loads plotly.js without an interactive figure"
            continue
        with_figures.add(Path(rel).stem)
        size = sum(len(f.encode()) for f in figures)
        assert size <= interactive.PAGE_BUDGET, f"{rel}: {size:,} bytes of interactive figures"
        relative = "../" * rel.count("/") + f"_static/{publish.PLOTLY_JS}"
        assert [link.split("?")[0] for link in loads] == [relative], f"{rel} loads plotly.js as {loads}"
    assert {"01_global_orientation", "04_layerwise_geometry", "05_sae_feature_matching"} <= with_figures


def test_chapter_pages_launch_their_source_notebook_on_colab_and_binder(small_site):
    repo = launch.repository(ROOT)
    for stem in [p.stem for p in runner.chapter_sources(ROOT)]:
        page = (small_site / "_executed" / f"{stem}.html").read_text()
        links = launch.launch_links(repo, f"notebooks/{stem}.ipynb")
        assert all(f'href="{url}"' in page for url in links.values()), stem
        assert "Open in Colab" in page and "Launch Binder" in page, stem
        assert f"_executed/{stem}.ipynb" not in page.replace(f"_sources/_executed/{stem}.ipynb", ""), stem
        assert page.count("**On Colab or Binder.**") == 0 and page.count("On Colab or Binder.") == 1, stem
    ledger = (small_site / "_executed" / "ledger.html").read_text()
    assert "mybinder.org" not in ledger and "colab.research.google.com" not in ledger


# -- in a real browser ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (Playwright's own browser download is not used)."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class Visit:
    """A browser tab that records what goes wrong while a page loads."""

    def __init__(self, context, site_url: str) -> None:
        self.page = context.new_page()
        self.problems: list[str] = []
        origin = site_url.split(PREFIX)[0]
        self.page.on("pageerror", lambda exc: self.problems.append(f"script error: {exc}"))
        self.page.on(
            "console",
            lambda msg: (
                self.problems.append(f"console {msg.type}: {msg.text} ({msg.location.get('url')})")
                if msg.type == "error"
                else None
            ),
        )
        self.page.on(
            "response",
            lambda r: (
                self.problems.append(f"HTTP {r.status}: {r.url}")
                if r.status >= 400 and r.url.startswith(origin)
                else None
            ),
        )

    def open(self, url: str) -> Visit:
        self.problems.clear()
        self.page.goto(url, wait_until="load")
        self.page.wait_for_load_state("networkidle")
        return self


@pytest.fixture(scope="session")
def tab(browser, site_url):
    """One browser context for all pages; requests that leave the loopback site are refused and listed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.external = []  # type: ignore[attr-defined]

    def route(r):
        if r.request.url.startswith(site_url.split(PREFIX)[0]):
            r.continue_()
        else:
            context.external.append(r.request.url)  # type: ignore[attr-defined]
            r.abort()

    context.route("**/*", route)
    visit = Visit(context, site_url)
    yield visit
    context.close()


def _figures_in_notebook(path: Path) -> int:
    """Image outputs of an executed notebook that the HTML shows (cells not tagged to be removed)."""
    nb = json.loads(path.read_text())
    count = 0
    for cell in nb["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & {"remove-cell", "remove-output"}:
            continue
        count += sum(any(k.startswith("image/") for k in o.get("data", {})) for o in cell.get("outputs", []))
    return count


def test_every_page_loads_cleanly_and_every_figure_is_rendered(tab, site_url, small_site):
    pages = site_pages(small_site)
    chapters = {f"_executed/{p.stem}.html" for p in runner.chapter_sources(ROOT)}
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    problems: list[str] = []
    links: dict[str, list[str]] = {}
    ids: dict[str, set[str]] = {}
    for rel in pages:
        visit = tab.open(site_url + rel)
        page = visit.page
        problems += [f"{rel}: {p}" for p in visit.problems]
        links[rel] = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        ids[site_url + rel] = set(page.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))
        if rel in chapters:
            figures = page.eval_on_selector_all(
                "article .cell_output img",
                "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0 && e.naturalHeight > 0])",
            )
            expected = _figures_in_notebook(small_site / "_sources" / rel.replace(".html", ".ipynb"))
            problems += [f"{rel}: figure not rendered: {src}" for src, ok in figures if not ok]
            if len(figures) != expected:
                problems.append(f"{rel}: {len(figures)} figures shown, the executed notebook has {expected}")
            page.screenshot(path=str(SCREENSHOTS / f"{Path(rel).stem}.png"), full_page=True, timeout=120_000)
            problems += _layout_problems(page, rel, wide=True)  # at 1280 px (test_chapter_pages_fit_... below)
    # every internal link names a page or file of the site, and its anchor exists on that page
    for rel, hrefs in links.items():
        for href in hrefs:
            target, fragment = urldefrag(href)
            if not target.startswith(site_url):
                continue
            if target.endswith(".html") and target in ids:
                if fragment and unquote(fragment) not in ids[target]:
                    problems.append(f"{rel}: anchor #{fragment} missing on {target[len(site_url) :]}")
            elif _get(target)[0] != 200:
                problems.append(f"{rel}: link to {target} does not answer 200")
    print(f"\nscreenshots of the chapter pages: {SCREENSHOTS}")
    assert not problems, "\n".join(problems[:40])
    assert chapters <= set(pages) and len(list(SCREENSHOTS.glob("*.png"))) == len(chapters)
    assert not tab.page.context.external, f"the site loads from outside: {sorted(set(tab.page.context.external))}"


def test_ledger_page_shows_the_verdicts_of_this_runs_records(tab, site_url, small_book):
    page = tab.open(site_url + "_executed/ledger.html").page
    rows = page.evaluate(
        """() => {
          for (const table of document.querySelectorAll('article table')) {
            const head = [...table.querySelectorAll('thead th')].map(th => th.textContent.trim());
            if (!head.includes('claim') || !head.includes('verdict')) continue;
            return [...table.querySelectorAll('tbody tr')].map(tr => {
              const cells = [...tr.children].map(c => c.textContent.trim());
              return ['claim', 'statement', 'verdict', 'run'].map(name => cells[head.indexOf(name)]);
            });
          }
          return [];
        }"""
    )
    assert not tab.problems
    recorded = _recorded_claims(small_book)
    listed = {int(number): (statement, verdict, run) for number, statement, verdict, run in rows}
    assert set(listed) == set(claims.CLAIMS), f"ledger lists claims {sorted(listed)}"
    for number, (statement, verdict, run) in listed.items():
        assert statement == claims.CLAIMS[number][0]
        assert (verdict, run) == recorded[number], f"claim {number}: the page says {verdict!r} from {run!r}"


def _recorded_claims(book: Path) -> dict[int, tuple[str, str]]:
    """Claim number -> (verdict, record file) from the records the small run wrote (each claim recorded once)."""
    found: dict[int, tuple[str, str]] = {}
    for record in results.load_records(runner.results_folder(book / "_executed", small=True)):
        for claim in record["claims"]:
            assert claim["number"] not in found, f"claim {claim['number']} recorded twice"
            assert claim["verdict"] in stats.VERDICTS, claim["verdict"]
            found[claim["number"]] = (claim["verdict"], record["run"]["record"])
    assert set(found) == set(claims.CLAIMS), f"the small run recorded claims {sorted(found)}"
    return found


def test_search_finds_intrinsic_dimension(tab, site_url):
    page = tab.open(site_url + "search.html?q=intrinsic+dimension").page
    page.wait_for_selector("#search-results ul.search li a", timeout=30_000)
    hits = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.href)")
    assert any("03_intrinsic_dimension.html" in h for h in hits), hits
    assert not tab.problems


def test_download_button_returns_the_executed_notebook(tab, site_url, tmp_path):
    stem = runner.chapter_sources(ROOT)[0].stem
    page = tab.open(site_url + f"_executed/{stem}.html").page
    page.click("button[aria-label='Download this page']")
    with page.expect_download() as download:
        page.click(".btn-download-source-button[href$='.ipynb']")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    nb = json.loads(saved.read_text())
    assert saved.name == f"{stem}.ipynb" and nb["nbformat"] == 4
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]


def test_site_opens_from_disk(browser, small_site):
    """The start page and a chapter work from disk (make_site checked every link of every page statically).

    Search is the one part that needs a server: Sphinx fetches its result snippets, which file:// forbids.
    """
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        visit = Visit(context, small_site.as_uri() + PREFIX)
        assert visit.open((small_site / "index.html").as_uri()).page.url.endswith("/book/intro.html")
        problems = []
        for rel in ("book/intro.html", f"_executed/{runner.chapter_sources(ROOT)[0].stem}.html"):
            visit.open((small_site / rel).as_uri())
            problems += [f"{rel}: {p}" for p in visit.problems]
            shown = visit.page.eval_on_selector_all("article img", "els => els.map(e => e.naturalWidth > 0)")
            problems += [f"{rel}: a figure is not rendered"] * shown.count(False)
        assert not problems, "\n".join(problems[:20])
    finally:
        context.close()


def test_interactive_figures_draw_show_values_on_hover_and_load_nothing_from_outside(tab, site_url):
    page = tab.open(site_url + "_executed/01_global_orientation.html").page
    page.wait_for_function(
        "() => [...document.querySelectorAll('.embgeo-plotly')].every(e => e.classList.contains('embgeo-drawn'))",
        timeout=60_000,
    )
    state = page.evaluate(
        """() => ({
          figures: document.querySelectorAll('.embgeo-plotly').length,
          graphs: document.querySelectorAll('.embgeo-plotly .main-svg').length,
          twins: [...document.querySelectorAll('img.embgeo-static')].map(i => getComputedStyle(i).display),
          notes: [...document.querySelectorAll('.embgeo-plotly-note')].filter(n => n.offsetParent).length,
        })"""
    )
    assert state["figures"] == 3 and state["graphs"] >= 3, state  # the pair heatmaps, the scatter, the layer map
    assert state["twins"] == ["none"] * 3 and state["notes"] == 0, state  # each static image kept for print only
    layer_map = page.locator(f".{interactive.HTML_CLASS}[data-kind='heatmap'] .nsewdrag").last
    layer_map.scroll_into_view_if_needed()
    box = layer_map.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector(".hoverlayer .hovertext", state="attached", timeout=10_000)
    tooltip = page.text_content(".hoverlayer .hovertext") or ""
    assert re.search(r"layer \d+.*layer \d+.*r = -?\d\.\d{3}", tooltip), tooltip
    page.emulate_media(media="print")
    shown = page.evaluate("() => [...document.querySelectorAll('img.embgeo-static')].map(i => i.offsetWidth > 0)")
    page.emulate_media(media="screen")
    assert shown == [True] * 3, "in print the static images are shown"
    assert not tab.problems, tab.problems
    assert not tab.page.context.external, f"the page loads from outside: {sorted(set(tab.page.context.external))}"


_LAYOUT = """(wide) => {
  // open what a reader can open: collapsed code (hide-input) and the solutions' dropdowns
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  document.querySelectorAll('.toggle-hidden').forEach(e => e.classList.remove('toggle-hidden'));
  const article = document.querySelector('article.bd-article') || document.querySelector('article');
  const box = article.getBoundingClientRect();
  const root = document.scrollingElement;
  const out = {page: [root.scrollWidth, root.clientWidth], overflow: [], scrolls: [], shrunk: []};
  const shown = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0 ? r : null; };
  for (const el of article.querySelectorAll('.cell_input, .cell_output, .cell_output > .output, .embgeo-plotly')) {
    const r = shown(el);
    if (r && (r.right > box.right + 1 || r.left < box.left - 1)) out.overflow.push(`${el.className}: ${Math.round(r.width)} px`);
  }
  if (!wide) return out;
  for (const pre of article.querySelectorAll('.cell_input pre')) {
    if (shown(pre) && pre.scrollWidth > pre.clientWidth + 1) {
      const longest = pre.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      out.scrolls.push(`${longest.length} characters: ${longest}`);
    }
  }
  for (const img of article.querySelectorAll('.cell_output img')) {
    const r = shown(img);
    if (r && r.width < (2 / 3) * img.naturalWidth) out.shrunk.push(`${img.getAttribute('src')}: ${Math.round(r.width)} of ${img.naturalWidth} px`);
  }
  return out;
}"""


def _layout_problems(page, rel: str, wide: bool) -> list[str]:
    found = page.evaluate(_LAYOUT, wide)
    problems = [f"{rel}: the page is {found['page'][0]} px wide in a {found['page'][1]} px window"] * (
        found["page"][0] > found["page"][1]
    )
    problems += [f"{rel}: wider than the column: {item}" for item in found["overflow"]]
    problems += [f"{rel}: a code line does not fit the column: {item}" for item in found["scrolls"]]
    problems += [f"{rel}: a figure shown below two thirds of its drawn width: {item}" for item in found["shrunk"]]
    return problems


def test_pages_fit_a_phone(browser, site_url, small_site):
    """No page wider than a phone's window, and no block wider than its column there.

    At 1280 px, :func:`test_every_page_loads_cleanly_and_every_figure_is_rendered` checks every chapter page with the
    same function (:func:`_layout_problems`): no code block or output wider than its column, no code line that
    scrolls, no figure shown below two thirds of its drawn width.
    """
    problems = []
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True)
    phone.route("**/*", lambda r: r.continue_() if r.request.url.startswith(site_url) else r.abort())
    try:
        visit = Visit(phone, site_url)
        for rel in site_pages(small_site):
            if rel in ("genindex.html", "search.html"):
                continue
            problems += _layout_problems(visit.open(site_url + rel).page, f"{rel} (phone)", wide=False)
    finally:
        phone.close()
    assert not problems, "\n".join(problems[:40])
