"""Shared fixtures: packaged test models loaded once per session from the user cache, and one small book build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embgeo_utils.book import parameters, publish
from embgeo_utils.core.device import get_device
from embgeo_utils.lm import models

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "mps"),
        help="device the tests compute on (default cpu; cuda or mps to check the GPU path)",
    )
    parser.addoption(
        "--small-book",
        default=None,
        metavar="DIR",
        help="reuse a book copy that an earlier run executed and built (skips the chapters and the build: "
        "for iterating on the HTML tests only)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests that load a packaged model get the ``models`` marker (``-m "not models"`` skips them)."""
    for item in items:
        if {"smollm", "gemma"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.models)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """The device chosen with ``--device`` (checked to exist)."""

    return str(get_device(pytestconfig.getoption("device")))


@pytest.fixture(scope="session")
def smollm(device):

    return models.load("smollm2-135m", device=device)


@pytest.fixture(scope="session")
def gemma(device):

    return models.load("gemma3-270m", device=device)


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache folder for tests that must not touch the user cache."""
    monkeypatch.setenv("EMBGEO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def small_book(tmp_path_factory, pytestconfig) -> Path:
    """A copy of the book with every chapter executed on small parameters (once per session)."""
    reuse = pytestconfig.getoption("small_book")
    if reuse:
        return Path(reuse).resolve()
    work = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml", "book", "notebooks"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    done = subprocess.run(
        [sys.executable, "-m", "embgeo_utils.book.runner", "--root", str(work), "--small"],
        capture_output=True,
        text=True,
        env={**os.environ, "EMBGEO_CELL_TIMEOUT": "1800"},  # a hung cell fails the tests instead of stalling them
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return work


@pytest.fixture(scope="session")
def small_build(small_book, pytestconfig) -> subprocess.CompletedProcess:
    """The one Jupyter Book build of :func:`small_book` (warnings as errors); its HTML is in ``_build/html``."""
    jb = Path(sys.executable).with_name("jupyter-book")
    command = [str(jb), "build", str(small_book), "-W", "-n", "--keep-going"]
    if pytestconfig.getoption("small_book"):
        return subprocess.CompletedProcess(command, 0, "reused", "")
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="session")
def small_site(small_book, small_build) -> Path:
    """``make site``'s folder made from the small build (what the site and browser tests serve)."""

    if small_build.returncode != 0:
        pytest.fail("the small book did not build; test_book_builds_without_warnings shows why")
    return publish.make_site(small_book / "_build" / "html", small_book / "_site")


@pytest.fixture(scope="session")
def chapter_params():
    """``make(module, **overrides)``: a chapter's ``Parameters`` with its notebook's defaults, on the CPU, overridden."""

    def make(module, **overrides):
        notebook = next((ROOT / "notebooks").glob(f"{module.CHAPTER[2:4]}_*.ipynb"))
        values = {name: p.default for name, p in parameters.notebook_parameters(notebook).items()}
        return module.Parameters(**{**values, "device": "cpu", **overrides})

    return make
