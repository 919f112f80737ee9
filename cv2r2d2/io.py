"""Photo collections: image files, feature and match stores, extraction over a collection.

The names of this module live in the modules that own them; they are gathered here,
as the documentation's examples import them:

- :mod:`cv2r2d2.image`: ``IMAGE_SUFFIXES``, ``list_images``, ``read_image``,
  ``check_image_suffix``, ``write_image``;
- :mod:`cv2r2d2.stores`: ``ImageFeatures``, ``FeatureStore``, ``R2D2Folder``,
  ``H5Features``, ``feature_format``, ``open_features``, ``pair_key``, ``H5Matches``
  (the file layouts are described there);
- :mod:`cv2r2d2.pairs`: ``read_pairs``, ``write_pairs``;
- :mod:`cv2r2d2.collection`: ``ExtractionReport``, ``detect``, ``extract_collection``;
- :mod:`cv2r2d2.utils`: ``MissingDependencyError``, ``import_optional``, ``progress``,
  ``logging_beside_progress``, ``atomic_path``.
"""
from __future__ import annotations

from .collection import ExtractionReport, detect, extract_collection
from .image import IMAGE_SUFFIXES, check_image_suffix, list_images, read_image, write_image
from .pairs import read_pairs, write_pairs
from .stores import (
    FeatureStore, H5Features, H5Matches, ImageFeatures, R2D2Folder, feature_format,
    open_features, pair_key,
)
from .utils import (
    MissingDependencyError, atomic_path, import_optional, logging_beside_progress, progress,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MissingDependencyError",
    "import_optional",
    "progress",
    "logging_beside_progress",
    "atomic_path",
    "list_images",
    "read_image",
    "check_image_suffix",
    "write_image",
    "ImageFeatures",
    "FeatureStore",
    "R2D2Folder",
    "H5Features",
    "feature_format",
    "open_features",
    "pair_key",
    "H5Matches",
    "read_pairs",
    "write_pairs",
    "ExtractionReport",
    "detect",
    "extract_collection",
]
