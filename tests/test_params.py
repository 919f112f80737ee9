"""Extraction parameters are validated with errors naming the parameter."""
from __future__ import annotations

import pytest

from cv2r2d2.params import ExtractionParams


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scale_f=1.0), "scale_f"),
        (dict(min_scale=0.5, max_scale=0.4), "min_scale"),
        (dict(max_scale=2.0), "max_scale"),
        (dict(reliability_thr=1.5), "reliability_thr"),
        (dict(nfeatures=-1), "nfeatures"),
        (dict(nfeatures=2.5), "nfeatures"),
        (dict(max_size=0), "max_size"),
        (dict(scale_f=float("nan")), "finite"),
        (dict(unique_radius=-1.0), "unique_radius"),
    ],
)
def test_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExtractionParams(**kwargs)
    with pytest.raises(TypeError, match="number"):
        ExtractionParams(nfeatures="5000")
