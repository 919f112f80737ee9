"""Installation of cv2r2d2 (metadata lives here; pyproject.toml only names the backend)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")
# The version is stated once, in cv2r2d2/version.py.
VERSION = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("cv2r2d2").joinpath("version.py").read_text()).group(1)

setup(
    name="cv2r2d2",
    version=VERSION,
    description="R2D2 learned local features as a drop-in cv2.Feature2D (SIFT/ORB replacement)",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause (code); the official R2D2 weights are CC BY-NC-SA 3.0 (NAVER)",
    python_requires=">=3.9",
    packages=find_packages(include=["cv2r2d2", "cv2r2d2.*"]),
    install_requires=[
        "opencv-python>=4.5",
        "torch>=2.0",
        "numpy>=1.21",
        "scipy>=1.7",
    ],
    extras_require={
        "train": ["tqdm"],
        "sfm": ["pycolmap>=4.2", "h5py", "tqdm", "matplotlib"],
        "onnx": ["onnx", "onnxruntime"],
        "ray": ["ray", "h5py", "tqdm"],
        # The documentation site (mkdocs build --strict) and its snippet tests (tests/test_docs.py).
        "docs": ["mkdocs==1.6.1", "mkdocs-material>=9.5", "mkdocstrings[python]>=1.0", "sybil>=10"],
        # Everything the test suite exercises.
        "test": ["pytest>=7", "tqdm", "pycolmap>=4.2", "h5py", "matplotlib", "onnx", "onnxruntime",
                 "ray", "import-linter>=2"],
    },
    entry_points={
        "console_scripts": [
            "cv2r2d2=cv2r2d2.cli:main",
            "cv2r2d2-train=cv2r2d2.cli:train_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
