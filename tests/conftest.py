"""Shared fixtures: packaged test models are loaded once per session from the user cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm():
    from embgeo_utils import models

    return models.load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma():
    from embgeo_utils import models

    return models.load("gemma3-270m", device="cpu")


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache folder for tests that must not touch the user cache."""
    monkeypatch.setenv("EMBGEO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
