"""Opening a chapter on Colab or Binder: the launch links, the setup cell, and the note on where it fits (every chapter).

The repository is named once, in ``_config.yml``'s ``repository:`` block (``url`` and ``branch``): the launch
buttons and the chapters' setup cells are made from it. A fork changes that block and runs
``python -m embgeo_utils.book.launch`` to rewrite the setup cells (a test says when they are stale).

- :func:`launch_links` gives the Colab and Binder URLs of a chapter's *source* notebook,
  ``notebooks/NN_name.ipynb``. The book is built from the executed copies in ``_executed/``, which are not in
  the repository, so the Sphinx extension (:mod:`embgeo_utils.book.publish`) puts these links in place of the
  theme's.
- :func:`setup_cell_source` and :func:`write_setup_cells`: the first cell of every chapter notebook, tagged
  :data:`SETUP_TAG` and ``remove-cell`` (hidden in the book). On a fresh Colab kernel it installs this package
  from the repository, then :func:`embgeo_utils.book.hosted.setup` installs torch, the dependencies and the
  chapter's models; anywhere else it does nothing, so the book's own runs execute it as a no-op.
- :func:`hosting_note`: the markdown the runner adds under a chapter's parameters: how much memory the chapter
  needs on Binder (about 2 GB) and Colab (about 12 GB) and which parameters to set there, from
  ``notebooks/params_hosted.yml``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from ..core.errors import EmbgeoInputError
from .parameters import chapter_sources, notebook_parameters, small_parameters

__all__ = [
    "BINDER_GB",
    "COLAB_GB",
    "HOSTED_PARAMETERS",
    "SETUP_TAG",
    "Repository",
    "chapter_models",
    "hosted_parameters",
    "hosting_note",
    "launch_links",
    "parse_repository",
    "repository",
    "setup_cell_source",
    "write_setup_cells",
]


#: Tag of a chapter's first cell, which installs the project on a hosted kernel.
SETUP_TAG = "hosted-setup"

#: Memory of a public Binder session and of a free Colab runtime, in GB (what the notes compare against).
BINDER_GB = 2
COLAB_GB = 12

#: Per chapter and host, the parameters to use there and the peak memory they need (``notebooks/``).
HOSTED_PARAMETERS = "params_hosted.yml"

_HOSTS = {"binder": ("Binder", BINDER_GB, "mybinder.org"), "colab": ("Colab", COLAB_GB, "free runtime")}


@dataclass(frozen=True)
class Repository:
    """The book's GitHub repository, as ``_config.yml`` names it.

    Attributes:
        owner: the GitHub user or organisation.
        name: the repository's name.
        branch: the branch the launch buttons and the setup cells use.
    """

    owner: str
    name: str
    branch: str

    @property
    def url(self) -> str:
        """``https://github.com/<owner>/<name>``."""
        return f"https://github.com/{self.owner}/{self.name}"

    @property
    def pip_url(self) -> str:
        """The requirement that installs this package from the branch: ``embgeo-utils @ git+https://...@branch``."""
        return f"embgeo-utils @ git+{self.url}@{self.branch}"


def parse_repository(url: str, branch: str = "main") -> Repository:
    """The :class:`Repository` of a GitHub URL (``https://github.com/<owner>/<name>``) and a branch.

    Raises:
        EmbgeoInputError: a URL that is not ``https://github.com/<owner>/<name>`` (Colab opens notebooks from
            GitHub only).
    """
    url = str(url or "").rstrip("/").removesuffix(".git")
    prefix = "https://github.com/"
    parts = url[len(prefix) :].split("/") if url.startswith(prefix) else []
    if len(parts) != 2 or not all(parts):
        raise EmbgeoInputError(
            f"_config.yml's repository.url must be https://github.com/<owner>/<name> (Colab opens notebooks from "
            f"GitHub), got {url!r}; set it to the repository that holds this book."
        )
    return Repository(parts[0], parts[1], str(branch or "main"))


def repository(root: str | Path = ".") -> Repository:
    """The repository named in ``<root>/_config.yml`` (``repository:`` ``url`` and ``branch``; see :func:`parse_repository`)."""
    config = yaml.safe_load((Path(root) / "_config.yml").read_text()) or {}
    block = config.get("repository") or {}
    return parse_repository(block.get("url", ""), block.get("branch", "main"))


def launch_links(
    repo: Repository,
    notebook: str,
    binderhub: str = "https://mybinder.org",
    colab: str = "https://colab.research.google.com",
) -> dict[str, str]:
    """The Colab and Binder URLs that open ``notebook`` (a path in the repository) on ``repo``'s branch.

    Binder opens the notebook in JupyterLab; Colab reads it from GitHub.
    """
    path = quote(notebook)
    return {
        "Colab": f"{colab.rstrip('/')}/github/{repo.owner}/{repo.name}/blob/{quote(repo.branch)}/{path}",
        "Binder": f"{binderhub.rstrip('/')}/v2/gh/{repo.owner}/{repo.name}/{quote(repo.branch)}?urlpath=lab/tree/{path}",
    }


def chapter_models(source: str | Path, small: dict[str, Any] | None = None) -> list[str]:
    """The models a chapter uses at its defaults and with the ``small`` overrides (registry names, in order).

    Reads the notebook's parameters cell and asks the chapter module's ``Parameters.models()``.
    """
    path = Path(source)
    module = importlib.import_module(f"embgeo_utils.chapters.ch{path.stem}")
    defaults = {name: p.default for name, p in notebook_parameters(path).items()}
    names: list[str] = []
    for values in (defaults, {**defaults, **(small or {})}):
        names += module.Parameters(**values).models()
    return list(dict.fromkeys(names))


def setup_cell_source(repo: Repository, models: list[str]) -> str:
    """The code of a chapter's setup cell (the first cell): install on Colab, then :func:`hosted.setup`.

    The code is written as ruff formats it for the book's column (``notebooks/ruff.toml``), so that
    ``make format-notebooks`` leaves the cell as this function writes it.
    """
    listed = [f"    {json.dumps(m)}," for m in models]
    return "\n".join(
        [
            "# On Colab or Binder: installs embgeo and this chapter's models",
            "# where missing. Elsewhere it does nothing.",
            "import importlib.util",
            "import subprocess",
            "import sys",
            "",
            'if "google.colab" in sys.modules:',
            '    if importlib.util.find_spec("embgeo_utils") is None:',
            f'        url = "{repo.pip_url}"',
            '        pip = [sys.executable, "-m", "pip", "install", "--quiet"]',
            '        subprocess.run([*pip, "--no-deps", url], check=True)',
            "        importlib.invalidate_caches()",
            "from embgeo_utils.book import hosted",
            "",
            "models = [",
            *listed,
            "]",
            "hosted.setup(models)",
        ]
    )


def _setup_cell(source: str) -> dict[str, Any]:
    lines = source.splitlines(keepends=True)
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": SETUP_TAG,
        "metadata": {"tags": [SETUP_TAG, "remove-cell"]},
        "outputs": [],
        "source": lines,
    }


def write_setup_cells(root: str | Path = ".", check: bool = False) -> list[Path]:
    """Write (or with ``check``, only compare) every chapter's setup cell; returns the notebooks that differ(ed).

    The cell is the notebook's first; an existing one (tagged :data:`SETUP_TAG`) is replaced, every other cell
    is left byte for byte as it was.
    """

    root = Path(root)
    repo = repository(root)
    small = small_parameters(root)
    changed = []
    for path in chapter_sources(root):
        text = path.read_text()
        nb = json.loads(text)
        cell = _setup_cell(setup_cell_source(repo, chapter_models(path, small.get(path.stem))))
        first = nb["cells"][0] if nb["cells"] else {}
        if SETUP_TAG in first.get("metadata", {}).get("tags", []):
            nb["cells"][0] = cell
        else:
            nb["cells"].insert(0, cell)
        new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if new != text:
            changed.append(path)
            if not check:
                path.write_text(new)
    return changed


def hosted_parameters(root: str | Path = ".") -> dict[str, dict[str, dict[str, Any]]]:
    """``notebooks/params_hosted.yml``: per chapter stem and host (``binder``, ``colab``), what to run there."""
    path = Path(root) / "notebooks" / HOSTED_PARAMETERS
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _literal(value: Any) -> str:
    """A Python literal for a parameters cell, strings in double quotes as the notebooks write them."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _host_lines(host: str, entry: dict[str, Any], small: dict[str, Any]) -> list[str]:
    """The note's item for one host: whether the chapter fits, its peak memory, and the parameters to set there."""
    label, gb, what = _HOSTS[host]
    peak = entry.get("peak_gb")
    memory = f"peak memory {peak} GB, measured" if peak is not None else "peak memory not measured"
    why = f" {entry['why'].strip()}" if entry.get("why") else ""
    head = f"- **{label}** (about {gb} GB of memory, {what}): "
    if not entry.get("fits", True):
        return [head + f"does not fit ({memory}).{why}"]
    base, overrides = entry.get("base", "defaults"), dict(entry.get("overrides") or {})
    values = {**small, **overrides} if base == "small" else overrides
    if not values:
        return [head + f"the defaults ({memory}).{why}"]
    name = {
        ("small", False): "the small test parameters",
        ("small", True): "the small test parameters, adapted",
        ("defaults", True): "the defaults with these changes",
    }[(base, bool(overrides))]
    lines = [head + f"{name} ({memory}).{why}", "", "  ```python"]
    return lines + [f"  {k} = {_literal(v)}" for k, v in values.items()] + ["  ```"]


def hosting_note(stem: str, root: str | Path = ".", edition: str = "full") -> str | None:
    """Markdown for a chapter's page: where it fits on Binder and Colab and with which parameters (``None``: no entry).

    Reads ``notebooks/params_hosted.yml``: per host, ``base`` (``small``: the small test parameters, or
    ``defaults``), ``overrides`` on top of it, ``peak_gb`` (the peak memory measured with them), ``fits`` and ``why``.
    The ``student`` edition has no launch buttons: its note points at the page's download button instead.
    """
    entries = hosted_parameters(root).get(stem)
    if not entries:
        return None
    small = small_parameters(root).get(stem, {})
    if edition == "student":
        opening = (
            "**On Colab or Binder.** Download this chapter's notebook (the download button at the top of this page, "
            "`.ipynb`) and open it on Colab (File > Upload notebook) or in a Binder session of the book's repository."
        )
    else:
        opening = (
            "**On Colab or Binder.** The launch buttons at the top of this page (the rocket) open this chapter's "
            f"notebook, `notebooks/{stem}.ipynb`, on Colab or Binder."
        )
    lines = [
        opening + " Its first cell (hidden here) installs embgeo and the chapter's models on Colab (a few "
        "minutes); Binder's image already has them. Then set the cell tagged `parameters` as below and run all cells:",
        "",
    ]
    for host in _HOSTS:
        if host in entries:
            lines += _host_lines(host, entries[host], small)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--check", action="store_true", help="only say which setup cells are stale (exit 1 if any)")
    args = parser.parse_args(argv)
    changed = write_setup_cells(args.root, check=args.check)
    verb = "stale" if args.check else "rewritten"
    for path in changed:
        sys.stdout.write(f"{verb}: {path}\n")
    if not changed:
        sys.stdout.write("every chapter's setup cell matches _config.yml\n")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
