"""Output parity with the original R2D2 implementation (../shared/reference)."""
from __future__ import annotations

import ast

import cv2
import numpy as np
import pytest

import cv2r2d2
from conftest import image_path, reference_file, weights_file
from cv2r2d2.evaluation import parity_figures

MULTISCALE = [
    ("r2d2_WASF_N16", "brooklyn", "default"),
    ("r2d2_WASF_N16", "boat", "default"),
    ("r2d2_WAF_N16", "brooklyn", "default"),
    ("r2d2_WAF_N16", "boat", "default"),
    ("r2d2_WASF_N8_big", "brooklyn", "default"),
    ("r2d2_WASF_N8_big", "boat", "default"),
    ("faster2d2_WASF_N16", "brooklyn", "default"),
    ("faster2d2_WASF_N16", "boat", "default"),
    ("r2d2_WASF_N16", "test", "fullres"),
]
DENSE = ["r2d2_WASF_N16", "faster2d2_WASF_N16"]


def _extractor(model: str, **params) -> cv2r2d2.R2D2Feature:
    weights_file(model)
    return cv2r2d2.R2D2Feature.create(model=model, device="cpu", **params)


@pytest.mark.slow
@pytest.mark.parametrize("model,image,config", MULTISCALE, ids=lambda v: str(v))
def test_multiscale_parity(model, image, config):
    reference = np.load(reference_file(f"{model}__{image}__{config}.npz"))
    params = ast.literal_eval(str(reference["params"]))
    params["nfeatures"] = params.pop("top_k")
    extractor = _extractor(model, **params)
    keypoints, descriptors = extractor.detectAndCompute(cv2.imread(str(image_path(f"{image}.png"))), None)

    figures = parity_figures(keypoints, descriptors, reference)
    print(model, image, config, figures)
    assert len(keypoints) == len(reference["scores"])
    assert figures["overlap"] >= 0.995
    assert figures["max_score_error"] <= 1e-4
    assert figures["min_cosine"] >= 0.9999
    # Sorted by decreasing response, descriptors L2-normalised.
    responses = np.array([k.response for k in keypoints])
    assert np.all(np.diff(responses) <= 0)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("model", DENSE)
def test_dense_maps_parity(model):
    reference = np.load(reference_file(f"{model}__peppers_crop__dense.npz"))
    crop = cv2.imread(str(reference_file("peppers_crop_96x128.png")))
    maps = _extractor(model).computeDenseMaps(crop)
    for key in ("descriptors", "reliability", "repeatability"):
        assert maps[key].shape == reference[key].shape, key
        assert maps[key].dtype == np.float32
        np.testing.assert_allclose(maps[key], reference[key], atol=1e-4, rtol=0, err_msg=key)
