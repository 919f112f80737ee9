"""Match two images with R2D2 and estimate the homography between them.

    python examples/match_pair.py [IMAGE1 IMAGE2] [--output matches.png]

Without images, a sample photo and a synthetic perspective warp of it are used, and
the recovered homography is compared with the true one.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

import cv2r2d2

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "images" / "boat.png"
H_SYNTHETIC = np.array([[0.9, 0.1, 20.0], [-0.08, 0.95, 30.0], [1.5e-4, -1e-4, 1.0]])


def read(path: str) -> np.ndarray:
    image = cv2.imread(path)
    if image is None:
        raise SystemExit(f"cannot read image {path!r}")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="two images (default: a sample and its warp)")
    parser.add_argument("--output", default="matches.png", help="where to draw the matches")
    parser.add_argument("--model", default="r2d2_WASF_N16")
    parser.add_argument("--nfeatures", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if len(args.images) == 2:
        image1, image2 = read(args.images[0]), read(args.images[1])
        truth = None
    elif not args.images:
        image1 = read(str(SAMPLE))
        image2 = cv2.warpPerspective(image1, H_SYNTHETIC, image1.shape[1::-1])
        truth = H_SYNTHETIC
    else:
        raise SystemExit("give two images, or none for the built-in example")

    r2d2 = cv2r2d2.R2D2Feature.create(model=args.model, nfeatures=args.nfeatures)
    kp1, d1 = r2d2.detectAndCompute(image1, None)
    kp2, d2 = r2d2.detectAndCompute(image2, None)
    if d1 is None or d2 is None:
        raise SystemExit("no keypoints detected in one of the images")
    matches = cv2.BFMatcher(r2d2.defaultNorm(), crossCheck=True).match(d1, d2)
    src = np.float32([kp1[m.queryIdx].pt for m in matches])
    dst = np.float32([kp2[m.trainIdx].pt for m in matches])
    if len(matches) < 4:
        raise SystemExit(f"only {len(matches)} matches: cannot estimate a homography")
    H, inliers = cv2.findHomography(src, dst, cv2.RANSAC, 3.0)
    if H is None:
        raise SystemExit("RANSAC found no homography")
    inliers = inliers.ravel().astype(bool)

    print(f"keypoints: {len(kp1)} / {len(kp2)}, mutual matches: {len(matches)}, "
          f"RANSAC inliers: {inliers.sum()}")
    print("homography:\n" + np.array2string(H / H[2, 2], precision=5, suppress_small=True))
    if truth is not None:
        h, w = image1.shape[:2]
        corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
        error = np.linalg.norm(cv2.perspectiveTransform(corners, H)
                               - cv2.perspectiveTransform(corners, truth), axis=2).mean()
        print(f"mean corner error against the true homography: {error:.2f} px")
    good = [m for m, keep in zip(matches, inliers) if keep]
    canvas = cv2.drawMatches(image1, kp1, image2, kp2, good[:300], None,
                             flags=cv2.DrawMatchesFlags_NOT_DRAW_SINGLE_POINTS)
    cv2.imwrite(args.output, canvas)
    print(f"drew {min(len(good), 300)} inlier matches to {args.output}")


if __name__ == "__main__":
    main()
