"""Swap SIFT for R2D2 in an existing OpenCV pipeline: one line changes.

    python examples/replace_sift.py [IMAGE1 IMAGE2]
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

import cv2r2d2

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"


def count_inliers(detector, image1: np.ndarray, image2: np.ndarray) -> int:
    """The same pipeline for any cv2.Feature2D: detect, describe, match, RANSAC."""
    kp1, d1 = detector.detectAndCompute(image1, None)
    kp2, d2 = detector.detectAndCompute(image2, None)
    matches = cv2.BFMatcher(detector.defaultNorm(), crossCheck=True).match(d1, d2)
    src = np.float32([kp1[m.queryIdx].pt for m in matches])
    dst = np.float32([kp2[m.trainIdx].pt for m in matches])
    _, inliers = cv2.findHomography(src, dst, cv2.RANSAC, 3.0)
    return int(inliers.sum()) if inliers is not None else 0


def main() -> None:
    if len(sys.argv) == 3:
        image1, image2 = cv2.imread(sys.argv[1]), cv2.imread(sys.argv[2])
    else:
        image1 = cv2.imread(str(IMAGES / "peppers.png"))
        H = np.array([[0.85, 0.15, 30.0], [-0.1, 0.9, 40.0], [2e-4, -1e-4, 1.0]])
        image2 = cv2.warpPerspective(image1, H, image1.shape[1::-1])

    detector = cv2.SIFT_create(5000)
    print("SIFT inliers:", count_inliers(detector, image1, image2))

    detector = cv2r2d2.R2D2_create(5000)  # the only line that changes
    print("R2D2 inliers:", count_inliers(detector, image1, image2))


if __name__ == "__main__":
    main()
