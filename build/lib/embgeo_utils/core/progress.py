"""Progress bars that keep executed notebooks clean (every chapter).

In a terminal, :func:`tqdm` is the usual ``tqdm`` bar. Anywhere else (a notebook
executed by papermill, a log file, JupyterLab without widgets) nothing is written
while the work runs and one compact line is printed when it ends, e.g.
``[embgeo] smollm2-135m hidden states: 16 prompt in 12 s``. This keeps the
carriage-return fragments of text bars and the ``IProgress not found`` widget
warning out of the book. ``EMBGEO_PROGRESS=bar`` forces the bar, ``=off`` silences
even the closing line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm.std import tqdm as _std_tqdm

__all__ = [
    "LOG",
    "interactive",
    "show_messages",
    "tqdm",
]

#: The package's logger: notices (a damaged cache entry rebuilt, a model left out) and the closing lines of bars.
LOG = logging.getLogger("embgeo")


class _StdoutLines(logging.Handler):
    """Writes each message as one ``[embgeo] ...`` line to whatever ``sys.stdout`` is when it is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(f"[embgeo] {self.format(record)}\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            self.handleError(record)


def show_messages() -> None:
    """Show the package's messages as ``[embgeo] ...`` lines on standard output (chapters, the runner, the CLI).

    Adds one handler to the ``embgeo`` logger (never a second one) at level INFO.
    """
    LOG.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutLines) for h in LOG.handlers):
        LOG.addHandler(_StdoutLines())


def interactive() -> bool:
    """Whether progress goes to a terminal (``EMBGEO_PROGRESS`` overrides: ``bar``, ``line`` or ``off``)."""
    mode = os.environ.get("EMBGEO_PROGRESS", "").strip().lower()
    if mode in ("bar", "line", "off"):
        return mode == "bar"
    stream = sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Null:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass


class _CompactBar(_std_tqdm):
    """A tqdm bar that writes nothing while it runs and one line when it closes."""

    def close(self) -> None:
        if not self.disable and os.environ.get("EMBGEO_PROGRESS", "").strip().lower() != "off":
            elapsed = self.format_dict.get("elapsed", 0.0)
            label = f"{self.desc}: " if self.desc else ""
            unit = self.unit if self.unit != "it" else "steps"
            LOG.info(f"{label}{self.n} {unit} in {elapsed:.0f} s")
        super().close()


def tqdm(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm.tqdm`` in a terminal; elsewhere a bar that prints one compact line when it closes (every chapter)."""
    if kwargs.get("disable") or interactive():
        return _std_tqdm(iterable, **kwargs)
    kwargs["file"] = _Null()
    kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), 3600.0)
    return _CompactBar(iterable, **kwargs)
