"""Presenting and publishing the book: parameters as run, and the static site (every chapter; ``make site``).

After papermill runs a chapter, :func:`show_parameters` hides its parameters cell
and papermill's injected-parameters cell in the HTML (Jupyter Book's
``remove-cell`` tag; the downloaded ``.ipynb`` keeps both) and puts one compact
table in their place: each parameter, the value the chapter ran with (and the
default where it was overridden) and the comment of the parameters cell.
:func:`hide_plumbing` collapses the code of the cells that only import or open
the chapter (``hide-input``: a reader can still open them; their output stays).

:func:`make_site` turns Jupyter Book's ``_build/html`` into a self-contained folder
for any static host: a copy with ``.nojekyll`` (GitHub Pages would otherwise hide
``_static/``), checked so that every local link is relative, stays inside the
folder and names a file that exists. Such a folder works when served from a
sub-path (``https://<user>.github.io/<repo>/``) and when opened from disk.
``python -m embgeo_utils.book.publish`` does this for ``make site``.

The module is also a Sphinx extension (``_config.yml`` lists it):

- It adds the book's stylesheet (``static/embgeo.css``: wide tables scroll inside their
  frame, code and outputs never widen the page, the static twin of an interactive figure
  is kept for print) to every page, and plotly.js with the script that draws the
  interactive figures (:mod:`embgeo_utils.chapters.interactive`) to the pages that hold
  one. plotly.js is copied once into the site's ``_static`` folder from the installed
  plotly package and linked relatively: nothing is loaded from outside the site.
- Sphinx 7.4 writes an inline script that an extension adds after the builder started
  twice (once with file name ``None``, once with ``""``), and sphinx-thebe's ``const
  THEBE_JS_URL`` then throws "already been declared" in every browser console. Each
  page keeps the first copy of such a script.
- The theme's launch buttons (Colab, Binder) would open ``_executed/NN_name.ipynb``,
  which is not in the repository: on a chapter page they open the source,
  ``notebooks/NN_name.ipynb`` (:func:`embgeo_utils.book.launch.launch_links`); other
  pages (the ledger, which reads this build's records) get none.
- ``embgeo_edition`` (``full`` or ``student``, set by :mod:`embgeo_utils.book.student`)
  becomes a Sphinx tag, so a page can say ``{only} student``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from ..chapters.interactive import HTML_CLASS
from ..core.errors import EmbgeoInputError, MissingDependencyError, SiteError
from . import launch
from .results import results_dir

__all__ = [
    "HOSTING_NOTE_TAG",
    "PARAMETERS_TABLE_TAG",
    "PLOTLY_JS",
    "STATIC",
    "TABLE_ROWS",
    "check_site",
    "hide_plumbing",
    "is_plumbing",
    "local_links",
    "make_site",
    "parameters_table",
    "plotly_js",
    "setup",
    "show_parameters",
    "show_table",
]


#: Rows a chapter shows of a long table (:func:`show_table`); the rest is in the CSV it links.
TABLE_ROWS = 20


#: Tag of the markdown cell that shows a chapter's parameters as run.
PARAMETERS_TABLE_TAG = "parameters-as-run"


#: Tag of the markdown cell that says where a chapter fits on Colab and Binder (:func:`launch.hosting_note`).
HOSTING_NOTE_TAG = "hosting-note"


_HIDDEN = ("parameters", "injected-parameters")


#: The book's own static files (stylesheet, figure script), copied into the site's ``_static`` folder.
STATIC = Path(__file__).with_name("static")


#: The name of plotly.js in the site's ``_static`` folder (one copy, linked from the pages with interactive figures).
PLOTLY_JS = "plotly.min.js"
_CHAPTER_PAGE = re.compile(r"^_executed/(\d\d_\w+)$")


_LAUNCH_TEXT = {"Colab": "Open in Colab", "Binder": "Launch Binder"}


_NOT_PAGES = ("_static", "_sources")  # theme templates and page sources, not pages


_LINK_ATTRIBUTES = {"href", "src", "action", "poster"}


_EXTERNAL = ("http:", "https:", "mailto:", "data:", "javascript:", "tel:", "blob:", "about:")


def show_table(frame: Any, name: str, max_rows: int = TABLE_ROWS) -> Any:
    """Show a table in a chapter, trimmed to its first ``max_rows`` rows, with the whole table as a CSV (every chapter).

    A table of at most ``max_rows`` rows is returned unchanged (the cell shows it). A longer one is written whole to
    ``tables/<name>.csv`` in the results folder (:func:`embgeo_utils.book.results.results_dir`); the cell shows its
    first rows and a line with the row count and the CSV. Under the runner the executed notebook sits one folder
    above the results folder, so the line holds a MyST ``download`` role with the relative path and the book copies
    the file into the HTML as a download; elsewhere (JupyterLab) it names the file's path.

    Args:
        frame: a pandas DataFrame (already rounded for display).
        name: the CSV's file stem, unique in the book (start it with the chapter, e.g. ``"ch04_scale_curve"``).
        max_rows: rows shown.

    Returns:
        The table to show (the first ``max_rows`` rows of a long one).

    Raises:
        EmbgeoInputError: ``max_rows`` below 1 or a ``name`` that is not a plain file stem.
    """
    import os

    from IPython.display import Markdown, display

    if max_rows < 1:
        raise EmbgeoInputError(f"max_rows must be at least 1, got {max_rows}.")
    if not name or PurePosixPath(name).name != name or name.startswith("."):
        raise EmbgeoInputError(f"Table name {name!r} must be a plain file stem such as 'ch04_scale_curve'.")
    if len(frame) <= max_rows:
        return frame
    folder = results_dir() / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    frame.to_csv(path)
    where = f"`{path}`"
    if os.environ.get("EMBGEO_RESULTS"):  # the runner: the executed notebook is in the results folder's parent
        where = f"{{download}}`{path.name} <{path.relative_to(results_dir().parent).as_posix()}>`"
    display(Markdown(f"The first {max_rows} of {len(frame)} rows; the whole table: {where}."))
    return frame.head(max_rows)


def parameters_table(source: str | Path, overrides: dict[str, Any] | None = None) -> str:
    """Markdown table of a notebook's parameters as run: name, value, the parameters cell's comment.

    Args:
        source: the notebook source (its cell tagged ``parameters`` gives defaults and comments).
        overrides: the values papermill injected; each is shown with its default beside it.
    """
    import papermill as pm
    from papermill.translators import PythonTranslator

    overrides = dict(overrides or {})
    declared = pm.inspect_notebook(str(source))
    rows = []
    for name, info in declared.items():
        default = str(info["default"])
        if name in overrides:
            value = f"`{PythonTranslator.translate(overrides.pop(name))}` (default `{default}`)"
        else:
            value = f"`{default}`"
        rows.append((f"`{name}`", value, str(info.get("help") or "")))
    for name, raw in overrides.items():  # papermill warns about these; they are shown all the same
        rows.append((f"`{name}`", f"`{PythonTranslator.translate(raw)}`", "not in the parameters cell"))
    lines = ["| parameter | value | meaning |", "|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lead = (
        "**Parameters of this run.** The notebook's cell tagged `parameters` holds the defaults; "
        "run it with others through `papermill -p name value` or `python -m embgeo_utils.book.runner`."
    )
    return lead + "\n\n" + "\n".join(lines)


def show_parameters(
    executed: str | Path, source: str | Path, overrides: dict[str, Any] | None = None, note: str | None = None
) -> None:
    """Hide the parameter cells of an executed notebook in the HTML and show the run's parameters once.

    The cell tagged ``parameters`` and papermill's ``injected-parameters`` cell get
    Jupyter Book's ``remove-cell`` tag; a markdown cell tagged
    :data:`PARAMETERS_TABLE_TAG` with :func:`parameters_table` follows them, then,
    when ``note`` is given, a markdown cell tagged :data:`HOSTING_NOTE_TAG` with it
    (both replaced, not repeated, when the notebook is processed again).
    """
    import nbformat

    path = Path(executed)
    nb = nbformat.read(path, as_version=4)
    ours = (PARAMETERS_TABLE_TAG, HOSTING_NOTE_TAG)
    cells = [c for c in nb.cells if not set(ours) & set(c.get("metadata", {}).get("tags", []))]
    last = None
    for i, cell in enumerate(cells):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if any(t in tags for t in _HIDDEN):
            if "remove-cell" not in tags:
                tags.append("remove-cell")
            last = i
    if last is not None:
        added = [(PARAMETERS_TABLE_TAG, parameters_table(source, overrides))]
        added += [(HOSTING_NOTE_TAG, note)] if note else []
        for offset, (tag, text) in enumerate(added, start=1):
            cell = nbformat.v4.new_markdown_cell(text)
            cell.metadata["tags"] = [tag]
            cells.insert(last + offset, cell)
    nb.cells = cells
    nbformat.write(nb, path)


#: The call that opens a chapter (:func:`embgeo_utils.book.results.start_chapter`): its cell is plumbing.
_OPENS_CHAPTER = "start_chapter"


def is_plumbing(source: str) -> bool:
    """Whether a code cell is plumbing: imports only, or the cell that opens the chapter (every chapter).

    A cell whose every statement is an ``import`` is plumbing, and so is the cell that calls
    :func:`~embgeo_utils.book.results.start_chapter` (with the lines that adapt the parameters to the models found).
    A cell that is not valid Python (a magic, say) is not.
    """
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    if not tree.body:
        return False
    if all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body):
        return True
    calls = (n for n in ast.walk(tree) if isinstance(n, ast.Call))
    return any(getattr(c.func, "attr", getattr(c.func, "id", None)) == _OPENS_CHAPTER for c in calls)


def hide_plumbing(executed: str | Path) -> None:
    """Collapse the code of an executed notebook's plumbing cells (:func:`is_plumbing`) in the HTML.

    They get Jupyter Book's ``hide-input`` tag: the page shows a button that opens the code, the output (the models
    found, the device) stays in view. The downloaded ``.ipynb`` is unchanged but for the tag.
    """
    import nbformat

    path = Path(executed)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        hidden = {"hide-input", "remove-input", "remove-cell", "hide-cell"} & set(tags)
        if cell.cell_type == "code" and not hidden and is_plumbing(cell.source):
            tags.append("hide-input")
    nbformat.write(nb, path)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key in _LINK_ATTRIBUTES and value:
                self.links.append(value.strip())
            elif key == "srcset" and value:
                self.links += [part.split()[0] for part in value.split(",") if part.strip()]


def local_links(page: str | Path) -> list[str]:
    """The links (href, src, ...) of an HTML page that point into the site, as written."""
    parser = _Links()
    parser.feed(Path(page).read_text(encoding="utf-8", errors="replace"))
    return [link for link in parser.links if not link.lower().startswith(_EXTERNAL) and not link.startswith("#")]


def check_site(folder: str | Path) -> list[str]:
    """Problems that would break the site on a sub-path or from disk (empty when there are none).

    Each local link of each page (not the theme's templates in ``_static/``) must be relative (no leading ``/``), stay inside
    ``folder`` and name an existing file (a folder does not open from disk).
    """
    root = Path(folder).resolve()
    problems = []
    for page in sorted(root.rglob("*.html")):
        if page.relative_to(root).parts[0] in _NOT_PAGES:
            continue
        where = page.relative_to(root).as_posix()
        for link in local_links(page):
            parts = urlsplit(link)
            if link.startswith("//") or parts.scheme:
                continue
            if link.startswith("/"):
                problems.append(f"{where}: absolute link {link!r} (breaks on a sub-path)")
                continue
            if not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if root not in target.parents and target != root:
                problems.append(f"{where}: link {link!r} leaves the site folder")
            elif target.is_dir():
                problems.append(f"{where}: link {link!r} names a folder (does not open from disk)")
            elif not target.is_file():
                problems.append(f"{where}: link {link!r} names a missing file")
    return problems


def make_site(html: str | Path, out: str | Path) -> Path:
    """Copy Jupyter Book's HTML to ``out`` as a self-contained static site with ``.nojekyll``.

    Args:
        html: the built HTML (``_build/html``).
        out: the site folder to (re)create.

    Raises:
        SiteError: ``html`` has no ``index.html``, or a local link would break (all are listed).
    """
    src, dst = Path(html), Path(out)
    if not (src / "index.html").is_file():
        raise SiteError(f"No index.html in {src}; build the book first (make html, or make book).")
    if dst.resolve() in (src.resolve(), *src.resolve().parents):
        raise SiteError(f"The site folder {dst} must not contain the HTML it is made from ({src}).")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".buildinfo", ".doctrees"))
    (dst / ".nojekyll").write_text("")
    problems = check_site(dst)
    if problems:
        shown = "\n  ".join(problems[:40])
        raise SiteError(f"{len(problems)} link(s) in {dst} would break when published:\n  {shown}")
    return dst


def plotly_js() -> Path:
    """The installed plotly package's own ``plotly.min.js`` (what the site serves from ``_static``).

    Raises:
        MissingDependencyError: plotly is not installed.
    """
    try:
        import plotly
    except ImportError as exc:
        raise MissingDependencyError(
            "The book's interactive figures need plotly: install the book's extras with `pip install -e '.[book]'`."
        ) from exc
    path = Path(plotly.__file__).with_name("package_data") / PLOTLY_JS
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing; reinstall plotly (`pip install --force-reinstall plotly`).")
    return path


def _static_folders(app: Any, config: Any) -> None:
    """``config-inited`` handler: the book's static files and plotly.js join the site's ``_static`` folder."""
    staged = Path(app.doctreedir).parent / "embgeo-static"
    staged.mkdir(parents=True, exist_ok=True)
    source, target = plotly_js(), staged / PLOTLY_JS
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        shutil.copyfile(source, target)
    config.html_static_path = [*config.html_static_path, str(STATIC), str(staged)]


def _page_assets(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """``html-page-context`` handler: plotly.js and the figure script on pages with an interactive figure.

    Both load deferred, in this order, from the site's ``_static`` folder (a relative link, as every asset's).
    Then scripts that differ only in file name None vs "" are dropped, the first kept.
    """
    if HTML_CLASS in str(context.get("body", "")):
        app.add_js_file(PLOTLY_JS, priority=600, loading_method="defer")
        app.add_js_file("embgeo-figures.js", priority=601, loading_method="defer")
    _drop_repeated_scripts(context)


def _drop_repeated_scripts(context: dict[str, Any]) -> None:
    """Keep the first of scripts that differ only in file name None vs ""."""
    seen, kept = set(), []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        key = (
            str(getattr(script, "filename", script) or ""),
            tuple(sorted((k, str(v)) for k, v in attributes.items())),
        )
        if key not in seen:
            seen.add(key)
            kept.append(script)
    if "script_files" in context:
        context["script_files"] = kept


def _launch_buttons(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """``html-page-context`` handler, after the theme's: a chapter's launch buttons open its source notebook.

    The theme builds its links from the page's path (``_executed/NN_name.ipynb``, not in the repository); on a
    chapter page each becomes :func:`launch.launch_links`' link to ``notebooks/NN_name.ipynb``, and on any other
    page the launch menu is dropped. Without ``launch_buttons`` in the configuration there is no menu to change.
    """
    buttons = context.get("header_buttons") or []
    group = next((b for b in buttons if isinstance(b, dict) and b.get("label") == "launch-buttons"), None)
    if group is None:
        return
    chapter = _CHAPTER_PAGE.match(pagename)
    if not chapter:
        buttons.remove(group)
        return
    options = app.config.html_theme_options
    repo = launch.parse_repository(options.get("repository_url", ""), options.get("repository_branch", ""))
    providers = options.get("launch_buttons", {})
    links = launch.launch_links(
        repo,
        f"notebooks/{chapter.group(1)}.ipynb",
        binderhub=providers.get("binderhub_url") or "https://mybinder.org",
        colab=providers.get("colab_url") or "https://colab.research.google.com",
    )
    kept = [b for b in group.get("buttons", []) if b.get("text") in links]
    for button in kept:
        button["url"] = links[button["text"]]
        button["text"] = _LAUNCH_TEXT[button["text"]]
    group["buttons"] = kept


def _edition_tag(app: Any, config: Any) -> None:
    """``config-inited`` handler: the ``embgeo_edition`` (``full`` or ``student``) becomes a Sphinx tag."""
    edition = str(config.embgeo_edition)
    if edition not in ("full", "student"):
        raise SiteError(f"embgeo_edition must be 'full' or 'student', got {edition!r}.")
    app.tags.add(edition)


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point (the book's ``_config.yml``): the fixes, assets and links of every page (module docstring)."""
    app.add_config_value("embgeo_edition", "full", "env")
    app.connect("config-inited", _edition_tag)
    app.connect("config-inited", _static_folders)
    app.add_css_file("embgeo.css")
    app.connect("html-page-context", _page_assets)
    app.connect("html-page-context", _launch_buttons, priority=502)  # the theme adds its buttons at 501
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", default="_build/html", help="built HTML (default: _build/html)")
    parser.add_argument("--out", default="_site", help="site folder to write (default: _site)")
    args = parser.parse_args(argv)
    site = make_site(args.html, args.out)
    pages = sum(1 for p in site.rglob("*.html") if p.relative_to(site).parts[0] not in _NOT_PAGES)
    where = PurePosixPath(site.resolve().as_posix())
    sys.stdout.write(
        f"The site: {where} ({pages} pages, links checked). Publish the folder as it is, or open {where}/index.html\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
