"""Publishing: parameters shown once, the static site's link check, the Pages workflow, ``make lab``."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from embgeo_utils.book import hosted, launch, publish
from embgeo_utils.core.errors import EmbgeoInputError, SiteError

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"
CHAPTER = ROOT / "notebooks" / "00_models_and_text.ipynb"


# -- parameters as run ---------------------------------------------------------------------------


def test_parameters_table_shows_values_as_run_with_defaults_and_comments():
    table = publish.parameters_table(CHAPTER, {"n_passages": 4, "model_names": ["smollm2-135m"], "extra": "a|b"})
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    assert "`4` (default `16`)" in rows["`n_passages`"]
    assert '`["smollm2-135m"]` (default `[' in rows["`model_names`"]
    assert "`256` |" in rows["`passage_tokens`"] and "default" not in rows["`passage_tokens`"]
    assert "tokens per passage" in rows["`passage_tokens`"]
    assert "not in the parameters cell" in rows["`extra`"] and r"a\|b" in rows["`extra`"]
    assert all(line.count(" | ") == 2 for line in rows.values())  # escaped pipes add no columns


def test_show_parameters_hides_both_parameter_cells_and_adds_one_table(tmp_path):
    nb = load_notebook_node(str(CHAPTER))  # as papermill reads it
    nb = parameterize_notebook(nb, {"n_passages": 4}, kernel_name="python3", language="python")
    path = tmp_path / CHAPTER.name
    nbformat.write(nb, path)
    for _ in range(2):  # processing twice leaves one table
        publish.show_parameters(path, CHAPTER, {"n_passages": 4})
    cells = nbformat.read(path, as_version=4).cells
    tags = [c.metadata.get("tags", []) for c in cells]
    hidden = [i for i, t in enumerate(tags) if "remove-cell" in t and launch.SETUP_TAG not in t]
    assert [("parameters" in tags[i]) or ("injected-parameters" in tags[i]) for i in hidden] == [True, True]
    tables = [i for i, t in enumerate(tags) if publish.PARAMETERS_TABLE_TAG in t]
    assert tables == [hidden[-1] + 1]
    assert cells[tables[0]].cell_type == "markdown" and "`4` (default `16`)" in cells[tables[0]].source
    assert len(cells) == len(nb.cells) + 1


def test_the_note_on_colab_and_binder_follows_the_table_once(tmp_path):
    path = tmp_path / CHAPTER.name
    shutil.copy(CHAPTER, path)
    note = launch.hosting_note(CHAPTER.stem, ROOT)
    for _ in range(2):
        publish.show_parameters(path, CHAPTER, None, note=note)
    tags = [c.metadata.get("tags", []) for c in nbformat.read(path, as_version=4).cells]
    table = [i for i, t in enumerate(tags) if publish.PARAMETERS_TABLE_TAG in t]
    notes = [i for i, t in enumerate(tags) if publish.HOSTING_NOTE_TAG in t]
    assert len(table) == 1 and notes == [table[0] + 1]


def test_show_parameters_without_overrides_still_shows_the_defaults_once(tmp_path):
    path = tmp_path / CHAPTER.name
    shutil.copy(CHAPTER, path)
    publish.show_parameters(path, CHAPTER, None)
    cells = nbformat.read(path, as_version=4).cells
    tables = [c for c in cells if publish.PARAMETERS_TABLE_TAG in c.metadata.get("tags", [])]
    assert len(tables) == 1 and "(default" not in tables[0].source and "`16`" in tables[0].source


@pytest.mark.parametrize(
    "source, plumbing",
    [
        ("import pandas as pd\nfrom embgeo_utils.book import results", True),
        ("ch = results.start_chapter(ch02)\nmodel_pairs = [p for p in model_pairs if set(p) <= set(ch.models)]", True),
        ("import pandas as pd\npd.set_option('display.max_rows', 5)", False),
        ("table = ch01.compare_models(tables, shared, ch.params)", False),
        ("%load_ext autoreload", False),
        ("", False),
    ],
)
def test_plumbing_is_imports_and_the_cell_that_opens_the_chapter(source, plumbing):
    assert publish.is_plumbing(source) is plumbing


def test_hide_plumbing_collapses_the_code_of_every_plumbing_cell_of_a_chapter(tmp_path):
    path = tmp_path / CHAPTER.name
    shutil.copy(CHAPTER, path)
    publish.show_parameters(path, CHAPTER, None)
    for _ in range(2):  # processing twice tags once
        publish.hide_plumbing(path)
    cells = nbformat.read(path, as_version=4).cells
    hidden = [c.source for c in cells if "hide-input" in c.metadata.get("tags", [])]
    assert any(s.lstrip().startswith(("import", "from")) for s in hidden)
    assert any("results.start_chapter(" in s for s in hidden)
    assert all(c.metadata.get("tags", []).count("hide-input") <= 1 for c in cells)
    parameters = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    assert "hide-input" not in parameters.metadata["tags"]  # removed whole, not collapsed
    assert len(hidden) < sum(c.cell_type == "code" for c in cells) / 3  # the argument stays in view


# -- the static site -----------------------------------------------------------------------------


def _page(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{body}</body></html>")


def test_show_table_trims_a_long_table_and_links_the_whole_csv(tmp_path, monkeypatch):
    import IPython.display
    import pandas as pd

    results = tmp_path / "_executed" / "results-small"
    monkeypatch.setenv("EMBGEO_RESULTS", str(results))
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    short = pd.DataFrame({"x": range(5)})
    assert publish.show_table(short, "ch99_short", max_rows=5) is short and not shown  # short tables pass through
    assert not (results / "tables").exists()
    long = pd.DataFrame({"x": range(30), "y": [f"row {i}" for i in range(30)]})
    head = publish.show_table(long, "ch99_long", max_rows=7)
    assert head.equals(long.head(7))
    csv = results / "tables" / "ch99_long.csv"
    assert pd.read_csv(csv, index_col=0).equals(long)
    (note,) = shown
    assert (
        "first 7 of 30 rows" in note.data
        and "{download}`ch99_long.csv <results-small/tables/ch99_long.csv>`" in note.data
    )
    with pytest.raises(EmbgeoInputError, match="plain file stem"):
        publish.show_table(long, "../elsewhere")
    with pytest.raises(EmbgeoInputError, match="max_rows"):
        publish.show_table(long, "ch99_long", max_rows=0)


@pytest.fixture()
def html(tmp_path) -> Path:
    root = tmp_path / "html"
    _page(root / "index.html", '<a href="ch/one.html#intro">one</a><img src="_static/f.png"><a href="#top">top</a>')
    _page(root / "ch" / "one.html", '<a href="../index.html">home</a><a href="https://example.org/x">out</a>')
    (root / "_static").mkdir()
    (root / "_static" / "f.png").write_bytes(b"\x89PNG")
    return root


def test_make_site_copies_the_html_with_nojekyll(html, tmp_path):
    site = publish.make_site(html, tmp_path / "site")
    assert (site / ".nojekyll").is_file() and (site / "_static" / "f.png").is_file()
    assert publish.check_site(site) == []
    assert publish.make_site(html, tmp_path / "site") == site  # an old site folder is replaced


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        ("/_static/f.png", "absolute link"),
        ("../../elsewhere.html", "leaves the site folder"),
        ("ch/", "names a folder"),
        ("ch/missing.html#x", "names a missing file"),
    ],
)
def test_check_site_finds_links_that_break_on_a_sub_path_or_from_disk(html, tmp_path, link, problem):
    _page(html / "index.html", f'<a href="ch/one.html">ok</a><a href="{link}">bad</a>')
    problems = publish.check_site(html)
    assert len(problems) == 1 and problem in problems[0] and link in problems[0]
    with pytest.raises(SiteError, match=problem):
        publish.make_site(html, tmp_path / "site")


def test_make_site_needs_a_built_book(tmp_path):
    with pytest.raises(SiteError, match="build the book first"):
        publish.make_site(tmp_path, tmp_path / "site")


# -- the Pages workflow --------------------------------------------------------------------------


def test_workflow_is_a_valid_github_actions_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:", 1))
    checker = Path(sys.executable).with_name("check-jsonschema")
    done = subprocess.run(  # one run checks the workflow and a broken copy (which must fail)
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW), str(broken)],
        capture_output=True,
        text=True,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 1 and "broken.yml::$.jobs.build" in report, report
    assert WORKFLOW.name not in report.replace(str(tmp_path), ""), report


def test_workflow_builds_with_the_readme_commands_and_deploys_only_from_main():
    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"]["branches"] == ["main"] and "pull_request" in triggers and "workflow_dispatch" in triggers
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    steps = build["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    assert "actions/upload-pages-artifact" in uses
    targets = set(re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1).split())
    runs = [s["run"] for s in steps if "run" in s]
    assert runs and all(r.split()[0] == "make" and set(r.split()[1:]) <= targets for r in runs)
    assert any("book" in r.split() for r in runs) and any("site" in r.split() for r in runs)
    artifact = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    site_default = re.search(r"^SITE \?= (\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert artifact["with"]["path"] == site_default
    # executed notebooks are cached under a key of what determines them; a hit skips execution
    cached = next(s for s in steps if s.get("id") == "executed")
    key = cached["with"]["key"]
    assert cached["with"]["path"] == "_executed"
    assert all(part in key for part in ("notebooks/", "embgeo_utils/", "requirements/", "book/"))
    book_step = next(s for s in steps if s.get("run") == "make book")
    assert "cache-hit != 'true'" in book_step["if"]
    model_cache = [s for s in steps if "~/.cache/embgeo" in str(s.get("with", {}).get("path", ""))]
    assert model_cache and all("hashFiles('requirements/*.txt'" in s["with"]["key"] for s in model_cache)
    # deploy: only outside pull requests, on main, with the Pages permissions
    assert "pull_request" in deploy["if"] and "refs/heads/main" in deploy["if"] and deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert [s["uses"].split("@")[0] for s in deploy["steps"]] == ["actions/deploy-pages"]
    assert wf["permissions"] == {"contents": "read"}


# -- make lab ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str, wait: float = 0) -> tuple[int, str]:
    """HTTP status of a GET without following redirects, and the Location header (retried ``wait`` s if refused)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.build_opener(NoRedirect).open(url, timeout=20) as response:
                return response.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location", "")
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _pump(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def test_make_lab_serves_jupyterlab_on_loopback_with_a_token(tmp_path):
    port = _free_port()
    venv = Path(sys.executable).parents[1]
    dry = subprocess.run(
        ["make", "-n", "lab", f"VENV={venv}", f"LAB_PORT={port}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    line = next(x for x in dry.stdout.replace("\\\n", " ").splitlines() if "jupyter lab" in x)
    argv = shlex.split(line)
    assert "--ServerApp.ip=127.0.0.1" in argv and "--ServerApp.root_dir=notebooks" in argv
    env = {"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_PLATFORM_DIRS": "1"}
    server = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(server.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and server.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            found = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=\w+", seen[-1])
            url = found.group(0) if found else None
        assert url, "no URL printed:\n" + "".join(seen[-40:])
        status, _ = _status(url, wait=30)  # the URL is printed just before the port accepts
        assert status == 200
        status, location = _status(f"http://127.0.0.1:{port}/lab")
        assert status in (302, 303) and "login" in location  # without the token: the login page
        token = url.split("=")[-1]
        status, _ = _status(f"http://127.0.0.1:{port}/api/contents/{CHAPTER.name}?token={token}")
        assert status == 200  # the chapters are what it serves
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}", timeout=20) as r:
            specs = json.load(r)
        kernel = specs["kernelspecs"][specs["default"]]["spec"]
        assert Path(kernel["argv"][0]).parent == Path(sys.executable).parent  # the project's interpreter
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- Binder ----------------------------------------------------------------------------------------


def test_binder_installs_cpu_torch_the_project_and_the_books_models():
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert os.access(ROOT / "binder" / "postBuild", os.X_OK)
    lines = [line for line in post_build.splitlines() if line.startswith("python -m pip install")]
    assert f'"{hosted.TORCH}" --index-url {hosted.CPU_INDEX}' in lines[0]
    assert lines[1].endswith(" -e .") and lines[2].endswith("--no-deps -r requirements/models-book.txt")
    env = yaml.safe_load((ROOT / "binder" / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"] and "pip" in env["dependencies"]


# -- the Pages workflow as a GitHub runner runs it -------------------------------------------------

#: Cache kinds the workflow leaves out besides the converted models: hidden states, GBs and minutes to recompute.
HIDDEN_STATES = {"activations", "sae_float32_states", "steering_states"}


def _make_install_torch(tmp_path: Path, **env: str) -> str:
    """The line ``make install`` would run to install torch, for a fresh virtual environment (a dry run)."""
    done = subprocess.run(
        ["make", "-n", "-B", f"VENV={tmp_path / 'venv'}", "install"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return next(line for line in done.stdout.splitlines() if "pip install" in line and "torch" in line)


def test_the_workflow_installs_the_cpu_build_of_torch(tmp_path):
    build = yaml.safe_load(WORKFLOW.read_text())["jobs"]["build"]
    assert build["env"]["TORCH_INDEX"] == hosted.CPU_INDEX == "https://download.pytorch.org/whl/cpu"
    line = _make_install_torch(tmp_path, TORCH_INDEX=build["env"]["TORCH_INDEX"])
    assert line.endswith(f"pip install '{hosted.TORCH}' --index-url '{hosted.CPU_INDEX}'"), line
    assert _make_install_torch(tmp_path, TORCH_INDEX="").endswith(f"pip install '{hosted.TORCH}'")
    with_options = _make_install_torch(tmp_path, TORCH=f"{hosted.TORCH} --index-url {hosted.CPU_INDEX}", TORCH_INDEX="")
    assert with_options.endswith(f"'{hosted.TORCH}' '--index-url' '{hosted.CPU_INDEX}'"), with_options


def test_the_workflow_caches_results_but_not_converted_models_or_hidden_states():
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["build"]["steps"]
    caches = [s for s in steps if s.get("uses", "").startswith("actions/cache")]
    paths = [p.strip() for s in caches for p in s["with"]["path"].splitlines() if p.strip()]
    assert not [p for p in paths if p.rstrip("/") in ("~/.cache", "~/.cache/embgeo") or p.startswith("!")]
    assert not [p for p in paths if re.match(r"~/\.cache/embgeo/(models|gguf)(/|$)", p)], paths
    source = "\n".join(p.read_text() for p in (ROOT / "embgeo_utils").rglob("*.py"))
    kinds = set(re.findall(r'@cached\(\s*"(\w+)"', source))
    kept = {p.removeprefix("~/.cache/embgeo/") for p in paths if p.startswith("~/.cache/embgeo/")}
    assert kept <= kinds and kinds - kept == HIDDEN_STATES, f"add a new cache kind to the workflow: {kinds - kept}"
    results = next(s for s in caches if "~/.cache/embgeo/sae" in s["with"]["path"])
    assert results["if"] == "steps.executed.outputs.cache-hit != 'true'"  # restored only when the chapters run
    header = WORKFLOW.read_text().split("\nname:")[0]
    assert all(word in header for word in ("10 GB", "GB, measured", "estimated", "models and gguf"))
