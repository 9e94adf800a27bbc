"""embgeo_utils: the math and plumbing behind the embgeo book."""

__version__ = "0.1.0"
