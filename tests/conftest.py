"""Shared fixtures: packaged test models are loaded once per session from the user cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "mps"),
        help="device the tests compute on (default cpu; cuda or mps to check the GPU path)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests that load a packaged model get the ``models`` marker (``-m "not models"`` skips them)."""
    for item in items:
        if {"smollm", "gemma"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.models)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """The device chosen with ``--device`` (checked to exist)."""
    from embgeo_utils.device import get_device

    return str(get_device(pytestconfig.getoption("device")))


@pytest.fixture(scope="session")
def smollm(device):
    from embgeo_utils import models

    return models.load("smollm2-135m", device=device)


@pytest.fixture(scope="session")
def gemma(device):
    from embgeo_utils import models

    return models.load("gemma3-270m", device=device)


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache folder for tests that must not touch the user cache."""
    monkeypatch.setenv("EMBGEO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
