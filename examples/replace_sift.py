"""Swap SIFT for R2D2 in an existing OpenCV pipeline: one line changes.

    python examples/replace_sift.py [IMAGE1 IMAGE2]

Both of OpenCV's usual matching recipes run unchanged on R2D2: cross-checked nearest
neighbours, and the tutorials' two nearest neighbours with Lowe's ratio test (0.75).
The swap sets ``unique_radius`` for the second: R2D2 finds a place on two or three
pyramid levels, so the same place's keypoint on another level can be a match's second
nearest neighbour, and takes a share of the keypoint budget (see the README's Usage).
Without arguments the pair is a sample image and a known warp of it, and the correct
matches (within 3 px of the truth) are counted too.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Tuple

import cv2
import numpy as np

import cv2r2d2

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"
# A viewpoint change: rotation of about 6 degrees, scale 0.9, a perspective tilt.
H_SAMPLE = np.array([[0.88, -0.1, 40.0], [0.09, 0.9, 10.0], [1e-4, -5e-5, 1.0]])

Points = Tuple[np.ndarray, np.ndarray]


def match_points(kp1: Any, kp2: Any, matches: Any) -> Points:
    """The (M, 2) float32 points of matches in image 1 and image 2."""
    return (np.float32([kp1[m.queryIdx].pt for m in matches]).reshape(-1, 2),
            np.float32([kp2[m.trainIdx].pt for m in matches]).reshape(-1, 2))


def cross_check_matches(norm: int, kp1: Any, d1: np.ndarray, kp2: Any, d2: np.ndarray) -> Points:
    """Mutual nearest neighbours."""
    return match_points(kp1, kp2, cv2.BFMatcher(norm, crossCheck=True).match(d1, d2))


def ratio_test_matches(norm: int, kp1: Any, d1: np.ndarray, kp2: Any, d2: np.ndarray,
                       ratio: float = 0.75) -> Points:
    """OpenCV's tutorial recipe: knnMatch(k=2), then Lowe's ratio test."""
    knn = cv2.BFMatcher(norm).knnMatch(d1, d2, k=2)
    good = [m for m, n in (pair for pair in knn if len(pair) == 2) if m.distance < ratio * n.distance]
    return match_points(kp1, kp2, good)


def homography_inliers(points: Points) -> int:
    """RANSAC inliers (3 px) of a homography between the matched points."""
    if len(points[0]) < 4:
        return 0
    _, inliers = cv2.findHomography(points[0], points[1], cv2.RANSAC, 3.0)
    return int(inliers.sum()) if inliers is not None else 0


def correct_matches(points: Points, homography: np.ndarray, max_error: float = 3.0) -> int:
    """Matches whose image-1 point, mapped by ``homography``, lies within max_error px."""
    if len(points[0]) == 0:
        return 0
    mapped = cv2.perspectiveTransform(points[0].reshape(-1, 1, 2).astype(np.float64), homography)
    return int((np.linalg.norm(mapped.reshape(-1, 2) - points[1], axis=1) <= max_error).sum())


def report(name: str, detector: Any, image1: np.ndarray, image2: np.ndarray,
           homography: Optional[np.ndarray]) -> None:
    """The same pipeline for any cv2.Feature2D: detect and describe once, both recipes."""
    kp1, d1 = detector.detectAndCompute(image1, None)
    kp2, d2 = detector.detectAndCompute(image2, None)
    for recipe, match in (("cross-check", cross_check_matches), ("ratio 0.75", ratio_test_matches)):
        points = match(detector.defaultNorm(), kp1, d1, kp2, d2)
        line = f"{name} {recipe}: {len(points[0])} matches, {homography_inliers(points)} inliers"
        if homography is not None:
            line += f", {correct_matches(points, homography)} correct"
        print(line)


def main() -> None:
    if len(sys.argv) not in (1, 3):
        sys.exit(f"usage: {sys.argv[0]} [IMAGE1 IMAGE2]")
    if len(sys.argv) == 3:
        image1, image2 = cv2.imread(sys.argv[1]), cv2.imread(sys.argv[2])
        if image1 is None or image2 is None:
            sys.exit(f"cannot read {sys.argv[1] if image1 is None else sys.argv[2]}")
        homography = None
    else:
        image1 = cv2.imread(str(IMAGES / "boat.png"))
        homography = H_SAMPLE
        image2 = cv2.warpPerspective(image1, homography, image1.shape[1::-1])

    detector = cv2.SIFT_create(5000)
    report("SIFT", detector, image1, image2, homography)

    detector = cv2r2d2.R2D2_create(5000, unique_radius=2)  # the only line that changes
    report("R2D2", detector, image1, image2, homography)


if __name__ == "__main__":
    main()
