"""Opening a chapter on Colab or Binder: the repository named once, the links, the setup cells, the notes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embgeo_utils.book import launch, parameters, runner
from embgeo_utils.core.errors import EmbgeoInputError

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = runner.chapter_sources(ROOT)


def test_the_repository_is_named_once_in_the_config():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = launch.repository(ROOT)
    assert repo.url == config["repository"]["url"] and repo.branch == config["repository"]["branch"]
    assert repo.pip_url == f"embgeo-utils @ git+{repo.url}@{repo.branch}"
    assert set(config["launch_buttons"]) >= {"binderhub_url", "colab_url"}


@pytest.mark.parametrize("url", ["https://gitlab.com/a/b", "https://github.com/only-owner", "", "github.com/a/b"])
def test_a_repository_that_colab_cannot_open_is_refused_with_what_to_set(url):
    with pytest.raises(EmbgeoInputError, match=r"repository.url must be https://github.com/<owner>/<name>"):
        launch.parse_repository(url)


def test_launch_links_open_the_source_notebook_on_the_branch():
    links = launch.launch_links(
        launch.parse_repository("https://github.com/me/fork.git", "dev"), "notebooks/02_lle.ipynb"
    )
    assert links == {
        "Colab": "https://colab.research.google.com/github/me/fork/blob/dev/notebooks/02_lle.ipynb",
        "Binder": "https://mybinder.org/v2/gh/me/fork/dev?urlpath=lab/tree/notebooks/02_lle.ipynb",
    }


def test_every_chapters_setup_cell_is_written_from_the_config():
    stale = launch.write_setup_cells(ROOT, check=True)
    assert not stale, f"run `python -m embgeo_utils.book.launch` to rewrite the setup cells of {stale}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_setup_cell_comes_first_hidden_and_names_the_chapters_models(path):
    first = json.loads(path.read_text())["cells"][0]
    assert first["cell_type"] == "code" and first["id"] == launch.SETUP_TAG
    assert first["metadata"]["tags"] == [launch.SETUP_TAG, "remove-cell"]
    source = "".join(first["source"])
    compile(source, path.name, "exec")
    small = parameters.small_parameters(ROOT).get(path.stem)
    assigned = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign) and n.targets[0].id == "models")
    assert ast.literal_eval(assigned.value) == launch.chapter_models(path, small)
    assert source.endswith("hosted.setup(models)")
    assert launch.repository(ROOT).pip_url in source


def test_the_setup_cell_is_formatted_and_does_nothing_off_a_hosted_kernel(tmp_path):
    source = "".join(json.loads(CHAPTERS[0].read_text())["cells"][0]["source"])
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "format", "--diff", "--stdin-filename", "notebooks/cell.py", "-"], input=source + "\n",
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BINDER_", "COLAB_", "EMBGEO_HOSTED"))}
    ran = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ran.returncode == 0 and ran.stdout == "", ran.stdout + ran.stderr


# -- where each chapter fits ---------------------------------------------------------------------


def test_every_chapter_says_where_it_fits_with_parameters_it_declares():
    hosted = launch.hosted_parameters(ROOT)
    assert set(hosted) == {p.stem for p in CHAPTERS}
    small = parameters.small_parameters(ROOT)
    for path in CHAPTERS:
        for host, entry in hosted[path.stem].items():
            assert host in ("binder", "colab") and set(entry) <= {"base", "overrides", "peak_gb", "fits", "why"}
            assert entry.get("base", "defaults") in ("small", "defaults")
            values = {**(small[path.stem] if entry.get("base") == "small" else {}), **(entry.get("overrides") or {})}
            parameters.check_overrides(path, values)
            peak = entry.get("peak_gb")
            limit = launch.BINDER_GB if host == "binder" else launch.COLAB_GB
            if peak is not None:  # a measured peak decides whether it fits
                assert (peak < limit) == entry.get("fits", True), f"{path.stem} on {host}: {peak} GB"
            else:
                assert entry.get("why"), f"{path.stem} on {host}: without a measured peak, say why it fits"


def test_the_note_gives_each_hosts_memory_and_the_lines_to_set():
    note = launch.hosting_note("02_lle", ROOT)
    assert note is not None and "`notebooks/02_lle.ipynb`" in note
    assert "- **Binder** (about 2 GB of memory" in note and "- **Colab** (about 12 GB of memory" in note
    entry = launch.hosted_parameters(ROOT)["02_lle"]["binder"]
    expected = {**parameters.small_parameters(ROOT)["02_lle"], **(entry.get("overrides") or {})}
    for name, value in expected.items():
        assert f"  {name} = {json.dumps(value)}" in note
    student = launch.hosting_note("02_lle", ROOT, edition="student")
    assert "download button" in student and "rocket" not in student
    assert launch.hosting_note("ledger", ROOT) is None
