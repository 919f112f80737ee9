"""cv2r2d2: the R2D2 learned local feature as a drop-in ``cv2.Feature2D``.

>>> import cv2, cv2r2d2
>>> r2d2 = cv2r2d2.R2D2Feature.create()
>>> keypoints, descriptors = r2d2.detectAndCompute(cv2.imread("a.jpg"), None)
"""
from typing import Any

from .feature2d import R2D2_create, R2D2Feature
from .version import __version__
__all__ = ["R2D2Feature", "R2D2_create", "SteeredMatcher", "load_model", "draw_heatmap",
           "__version__"]


def __getattr__(name: str) -> Any:
    # load_model needs torch; importing cv2r2d2 alone does not. Tools beside the
    # Feature2D (draw_heatmap, SteeredMatcher) load when first used.
    if name == "load_model":
        from .weights import load_model

        return load_model
    if name == "draw_heatmap":
        from .visualize import draw_heatmap

        return draw_heatmap
    if name == "SteeredMatcher":
        from .steered_matcher import SteeredMatcher

        return SteeredMatcher
    raise AttributeError(f"module 'cv2r2d2' has no attribute {name!r}")
