"""The package's version, stated here once (``setup.py`` and ``cv2r2d2.__version__`` read it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
"""The version of this package, as ``setup.py`` and ``cv2r2d2.__version__`` give it."""
