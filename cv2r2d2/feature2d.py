"""``R2D2Feature``: R2D2 behind the ``cv2.Feature2D`` interface.

It is duck-typed rather than a subclass: subclassing ``cv2.Feature2D`` from Python
crashes the interpreter at exit with OpenCV 5.0.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, ContextManager, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .backends import make_runner as _make_runner  # a module name: tests replace it
from .backends import torch_threads
from .config import R2D2Config, read_storage, write_storage
from .presets import DEFAULT_PRESET
from .checks import (check_descriptors, check_inside, check_keypoints, check_mask,
                     check_match_indices, check_matches, check_offsets, check_per_image,
                     check_points, check_positive, check_sizes, check_upsample,
                     check_window_dtype)
from .extractor import extract
from .image import normalize_image
from .params import Features, inside_image
from .pyramid import Level, upsampled_pyramid
from .runner import NetworkRunner
from .sampling import dense_maps, describe, descriptor_windows, refine_matches
from .steerer_cache import SteererSource
from .steerer_fitting import FitSettings
from .steerers import DEFAULT_ROTATIONS, Steerers, check_angle, rotation_angles
from .provenance import model_file

__all__ = ["R2D2Feature", "R2D2_create"]

logger = logging.getLogger(__name__)

KeyPoints = Tuple[cv2.KeyPoint, ...]


class _PresetValue:
    """The default of ``create()``'s arguments: the chosen preset's value."""

    def __repr__(self) -> str:
        return "PRESET"


PRESET = _PresetValue()


@functools.lru_cache(maxsize=None)
def _tell_own_size() -> None:
    """Say once per process (a collection of small images would repeat it per image) how
    images too small for the pyramid are processed."""
    logger.info("an image too small for the pyramid (no level with a longer side between "
                "min_size and max_size), where the original R2D2 finds nothing, is processed "
                "at its own size, scale 1; lower min_size to choose the levels yourself")


# The options whose change needs another network runner.
_NETWORK = ("model", "device", "backend", "precision", "num_threads")


def _runner_of(config: R2D2Config) -> NetworkRunner:
    return _make_runner(config.model, config.device, config.backend, config.precision,
                        config.num_threads)


def _to_keypoints(features: Features) -> KeyPoints:
    return tuple(
        cv2.KeyPoint(x, y, size, -1.0, score, octave, -1)
        for (x, y), size, score, octave in zip(
            features.xy.tolist(), features.sizes.tolist(),
            features.scores.tolist(), features.octaves.tolist(),
        )
    )


def _positions_and_sizes(keypoints: Sequence[cv2.KeyPoint]) -> Tuple[np.ndarray, np.ndarray]:
    """(N, 2) float32 ``pt`` and (N,) float32 ``size`` of ``cv2.KeyPoint`` objects."""
    xy = np.array([kp.pt for kp in keypoints], np.float32).reshape(-1, 2)
    return xy, np.array([kp.size for kp in keypoints], np.float32)


def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


class R2D2Feature:
    """R2D2 keypoint detector and descriptor extractor with the ``cv2.Feature2D`` API.

    Create it with :meth:`create` (or ``cv2r2d2.R2D2_create``). Keypoints are
    ``cv2.KeyPoint`` with ``pt`` in image pixels (the original's positions by default,
    OpenCV's pixel-centre convention with ``subpixel=True``: see
    :class:`~cv2r2d2.params.Features`), ``size`` the patch diameter
    (32 / pyramid scale), ``response`` the score (reliability x repeatability),
    ``octave`` the pyramid step (scale = scale_f ** -octave), ``angle`` -1; descriptors
    are float32 N x 128, L2-normalised, to be matched with ``cv2.NORM_L2``.
    """

    def __init__(self, config: Optional[R2D2Config] = None) -> None:
        """An extractor of ``config`` (None: the paper's); :meth:`create` builds one from
        keyword arguments."""
        if config is None:
            config = R2D2Config()
        if not isinstance(config, R2D2Config):
            raise TypeError(f"config must be an R2D2Config (or use R2D2Feature.create(...)), "
                            f"got {type(config).__name__}")
        self._config = config
        self._network = _runner_of(config)
        self._steerers = SteererSource()

    @classmethod
    def create(
        cls,
        model: Union[str, os.PathLike] = PRESET,
        nfeatures: int = PRESET,
        scale_f: float = PRESET,
        min_size: int = PRESET,
        max_size: int = PRESET,
        min_scale: float = PRESET,
        max_scale: float = PRESET,
        reliability_thr: float = PRESET,
        repeatability_thr: float = PRESET,
        unique_radius: float = PRESET,
        device: Optional[str] = PRESET,
        backend: str = PRESET,
        tile_size: int = PRESET,
        precision: str = PRESET,
        subpixel: Union[bool, str] = PRESET,
        num_threads: Optional[int] = PRESET,
        preset: str = DEFAULT_PRESET,
    ) -> "R2D2Feature":
        """Create an R2D2 feature extractor.

        Every argument not given takes the value of ``preset``; those of ``"paper"``, the
        default, are the original R2D2's settings and output, listed below.

        >>> r2d2 = R2D2Feature.create()                                  # the paper's
        >>> ratio = R2D2Feature.create(preset="ratio", nfeatures=1000)   # preset + override

        Args:
            model: an official model name (``r2d2_WASF_N16``, ``r2d2_WAF_N16``,
                ``r2d2_WASF_N8_big``, ``faster2d2_WASF_N16``) or a checkpoint path.
            nfeatures: keypoints kept, best scores first (0 keeps all).
            scale_f: ratio between pyramid scales.
            min_size: shortest longer image side of the pyramid's levels, pixels.
            max_size: longest longer image side of the pyramid's levels, pixels.
            min_scale: smallest scale of the pyramid.
            max_scale: largest scale of the pyramid (<= 1).
            reliability_thr: detection threshold on reliability, in [0, 1].
            repeatability_thr: detection threshold on repeatability, in [0, 1].
            unique_radius: pixels; > 0 keeps, of keypoints from different pyramid
                levels within this distance of each other, only the best-scoring
                one, before the top ``nfeatures`` (the same place is otherwise found
                on several levels). Set it for Lowe's ratio test (docs/opencv.md);
                0, the paper's, keeps the original's output.
            device: torch device (``"cpu"``, ``"cuda"``...); None: CUDA if available.
            backend: ``"torch"``; ``"onnxruntime"`` or ``"opencv"`` run an exported
                ONNX model (a ``.onnx`` path or a registry name) without torch;
                ``"reference"`` runs the network un-optimised, as the original code.
            tile_size: pyramid levels over tile_size**2 pixels run on overlapping
                tiles, with the same output, to bound memory; 0 never tiles.
            precision: ``"fp32"``, the exact mode; ``"bf16"``: the network in bfloat16 on
                the torch backend (on CUDA, float16 where the GPU lacks bfloat16); not
                bit-exact, faster only where the CPU computes bf16 natively (AVX512_BF16,
                AMX: a warning otherwise); ``"int8"``: an int8 network on ONNX Runtime,
                built and cached on first use (about a minute, :mod:`cv2r2d2.derived`);
                ``"auto"``: the fastest of these measured within 0.01 MMA@3 of the exact
                mode on this CPU (int8 with VNNI, else bf16 where native, else fp32).
            subpixel: refine keypoint positions to sub-pixel accuracy (not the
                original's output; docs/opencv.md): True, by a parabola on the
                repeatability peak; ``"descriptor"``, then by a mean-shift on the
                descriptor map (better at 1 px, 1.24-1.46 times the extraction time, measured).
            num_threads: CPU threads of the network, an integer >= 0. ONNX backends:
                the session's intra-op threads (``cv2.dnn``: set around each forward
                pass); None reads ``$CV2R2D2_NUM_THREADS``, 0 keeps the runtime's
                default. Torch backends: torch's thread count is process-wide, so it
                is set for the duration of each call (``detect``, ``compute``...) and
                restored after it (the switch costs microseconds); None or 0 leave it
                as it is. Calls from several Python threads with different counts
                then race for that one setting.
            preset: a name of :data:`cv2r2d2.presets.PRESETS` (``paper``, ``ratio``,
                ``accurate``, ``sfm``...; ``cv2r2d2 presets`` lists them with their
                purpose): the values of the arguments not given.
        """
        given = {name: value for name, value in locals().items()
                 if name != "cls" and value is not PRESET}
        return cls(R2D2Config.from_arguments(**given))

    # --- detection and description -------------------------------------------------

    def _pyramid(self, image: np.ndarray, upsample: float = 1.0) -> List[Level]:
        """The pyramid of a normalised (3, H, W) image, computed once per call and passed
        down (``upsample``: :func:`~cv2r2d2.pyramid.upsampled_pyramid`'s)."""
        height, width = image.shape[1:]
        return upsampled_pyramid(height, width, self._config.params, upsample,
                                 on_own_size=_tell_own_size)

    def _threads(self) -> ContextManager[None]:
        """torch's process-wide thread count set to ``num_threads`` while the runner works."""
        return torch_threads(self._config.num_threads, self._config.backend)

    def _detect_one(self, image: Any, mask: Any, name: str = "image") -> Features:
        normalised = normalize_image(image, name)
        levels = self._pyramid(normalised)
        mask = check_mask(mask, normalised.shape[1:], "mask")
        with self._threads():
            return extract(self._network, normalised, self._config.params, mask=mask,
                           tile_size=self._config.tile_size, subpixel=self._config.subpixel,
                           levels=levels)

    def detect(self, image: Any, mask: Any = None) -> Union[KeyPoints, Tuple[KeyPoints, ...]]:
        """Detect keypoints.

        Args:
            image: an OpenCV image (H x W [x 1|3|4], uint8/uint16/float) or a list of them.
            mask: None or uint8 H x W (keypoints where non-zero); a list for a list.

        Returns:
            A tuple of ``cv2.KeyPoint`` sorted by decreasing response (a tuple of such
            tuples for a list of images).
        """
        if _is_image_list(image):
            masks = check_per_image(mask, len(image), "masks", "mask", optional=True)
            return tuple(
                _to_keypoints(self._detect_one(img, m, f"images[{i}]"))
                for i, (img, m) in enumerate(zip(image, masks))
            )
        return _to_keypoints(self._detect_one(image, mask))

    def _compute_one(
        self, image: Any, keypoints: Any, name: str = "image"
    ) -> Tuple[KeyPoints, Optional[np.ndarray]]:
        normalised = normalize_image(image, name)
        levels = self._pyramid(normalised)
        keypoints = check_keypoints(keypoints)
        if not keypoints:
            return (), None
        xy, sizes = _positions_and_sizes(keypoints)
        with self._threads():
            descriptors, kept = describe(self._network, normalised, xy, sizes, self._config.params,
                                         tile_size=self._config.tile_size, levels=levels)
        if not len(kept):
            return (), None
        return tuple(keypoints[i] for i in kept.tolist()), descriptors

    def compute(
        self, image: Any, keypoints: Any, descriptors: Any = None
    ) -> Tuple[Any, Any]:
        """Describe given keypoints (R2D2's own, or SIFT's, ORB's...).

        Each keypoint is described at the pyramid level whose R2D2 keypoint size is
        closest to ``kp.size``, by bilinear sampling at ``kp.pt``. Keypoints outside
        the image are dropped.

        Returns:
            (kept keypoints, float32 N x 128 descriptors), or ``((), None)`` if none;
            for lists of images, (tuple of keypoint tuples, tuple of descriptors).
        """
        if _is_image_list(image):
            keypoints = check_per_image(keypoints, len(image), "keypoints", "keypoint list")
            results = [self._compute_one(img, kps, f"images[{i}]")
                       for i, (img, kps) in enumerate(zip(image, keypoints))]
            return tuple(r[0] for r in results), tuple(r[1] for r in results)
        return self._compute_one(image, keypoints)

    def detectAndCompute(
        self,
        image: Any,
        mask: Any = None,
        descriptors: Any = None,
        useProvidedKeypoints: bool = False,
        keypoints: Any = None,
    ) -> Tuple[KeyPoints, Optional[np.ndarray]]:
        """Detect keypoints and compute their descriptors in one pass.

        Returns:
            (tuple of ``cv2.KeyPoint``, float32 N x 128 descriptors), ``((), None)`` when
            nothing is detected. With ``useProvidedKeypoints=True`` the given
            ``keypoints`` are described instead (as :meth:`compute`).
        """
        if useProvidedKeypoints:
            if keypoints is None:
                raise ValueError("useProvidedKeypoints=True needs keypoints=...")
            return self._compute_one(image, keypoints)
        features = self._detect_one(image, mask)
        if not len(features):
            return (), None
        return _to_keypoints(features), features.descriptors

    def detectFeatures(self, image: Any, mask: Any = None) -> Features:
        """Detect and describe, returning arrays rather than ``cv2.KeyPoint`` objects.

        Returns:
            :class:`~cv2r2d2.params.Features`: ``xy`` (N, 2), ``sizes``, ``scores``,
            ``octaves`` (N,), ``descriptors`` (N, 128), sorted by decreasing score;
            the same keypoints as :meth:`detectAndCompute`.
        """
        return self._detect_one(image, mask)

    def refineMatches(
        self,
        image2: Any,
        descriptors1: np.ndarray,
        keypoints2: Sequence[cv2.KeyPoint],
        matches: Any,
        radius: float = 1.5,
        temperature: float = 0.01,
    ) -> np.ndarray:
        """Positions in image 2 of matches, refined against their image-1 descriptors.

        Around each matched keypoint of image 2, on its pyramid level, the dense
        descriptor map is compared with the partner's descriptor on a grid of +-radius
        level pixels; the match moves to the similarity's soft-argmax. It runs the
        network on image 2 again (about one more extraction). Best with
        ``subpixel=True`` keypoints (docs/opencv.md, sub-pixel keypoints).

        Args:
            image2: the image ``keypoints2`` were detected in.
            descriptors1: (N1, 128) float32 descriptors of image 1.
            keypoints2: image 2's keypoints.
            matches: ``cv2.DMatch`` list (queryIdx: image 1, trainIdx: image 2) or an
                (M, 2) integer array of (index in 1, index in 2).

        Returns:
            (M, 2) float32 positions in image 2, one per match in order, for e.g.
            ``cv2.findHomography(points1, refined, ...)``.
        """
        keypoints2 = check_keypoints(keypoints2)
        descriptors1 = check_descriptors(descriptors1, "descriptors1", size=self.descriptorSize(),
                                         allow_float64=False)
        pairs = check_match_indices(check_matches(matches), (len(descriptors1), len(keypoints2)))
        radius = check_positive(radius, "radius")
        temperature = check_positive(temperature, "temperature")
        normalised = normalize_image(image2, "image2")
        levels = self._pyramid(normalised)
        if not len(pairs):
            return np.zeros((0, 2), np.float32)
        xy, sizes = _positions_and_sizes([keypoints2[i] for i in pairs[:, 1].tolist()])
        with self._threads():
            return refine_matches(self._network, normalised, xy, sizes, descriptors1[pairs[:, 0]],
                                  self._config.params, radius=radius, temperature=temperature,
                                  tile_size=self._config.tile_size, levels=levels)

    def _descriptor_windows(
        self,
        image: Any,
        points: np.ndarray,
        offsets: np.ndarray,
        sizes: Optional[np.ndarray] = None,
        dtype: Any = np.float32,
        upsample: float = 1.0,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Dense descriptors on a small grid around each point, without a whole dense map.

        Each point is mapped to its pyramid level with consistent pixel centres and the
        level's descriptor map is sampled bilinearly at the point plus each offset, then
        L2-normalised (the windows of keypoint refinement, see ``cv2r2d2.refinement``).

        Args:
            image: the image the points lie in.
            points: (N, 2) positions in image pixels, inside the image.
            offsets: (K, 2) (dx, dy) in pixels of the point's level.
            sizes: (N,) keypoint diameters choosing each point's level as
                :meth:`compute` does; None: the finest processed level for all.
            dtype: ``np.float32`` or ``np.float16`` (half the memory).
            upsample: > 1 adds levels finer than the pyramid's finest (2: down to twice
                its resolution; the image is upsampled bilinearly), among which ``sizes``
                pick as before (``pyramid.upsampled_pyramid``).

        Returns:
            (N, K, 128) windows and (N, 2) float32 image pixels per level pixel (x, y).
        """
        normalised = normalize_image(image)
        height, width = normalised.shape[1:]
        points = check_points(points)
        points = check_inside(points, inside_image(points, height, width), height, width)
        offsets = check_offsets(offsets)
        sizes = check_sizes(sizes, len(points))
        dtype = check_window_dtype(dtype)
        upsample = check_upsample(upsample)
        levels = self._pyramid(normalised, upsample)
        with self._threads():
            return descriptor_windows(self._network, normalised, points, sizes, offsets,
                                      self._config.params, self._config.tile_size, dtype,
                                      upsample=upsample, levels=levels)

    def computeDenseMaps(self, image: Any, scale: float = 1.0) -> dict:
        """Dense network outputs on the image resized by ``scale`` (0 < scale <= 1).

        Returns:
            dict of float32 arrays: ``descriptors`` (128, h, w) L2-normalised,
            ``reliability`` and ``repeatability`` (h, w) in [0, 1].
        """
        normalised = normalize_image(image)
        with self._threads():
            return dense_maps(self._network, normalised, scale)

    # --- rotations: steerers --------------------------------------------------------

    def steer(self, descriptors: np.ndarray, angle: float) -> np.ndarray:
        """Descriptors "as if the image had been rotated by ``angle`` degrees".

        ``cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(r2d2.steer(d1, 90), d2)``
        matches image 1 against image 2 = image 1 rotated by 90 degrees. The model's
        steerer for an angle (:mod:`cv2r2d2.steerers`) is fitted when first asked for
        and cached in the package's cache folder.

        Args:
            descriptors: (N, 128) float32 descriptors of this model.
            angle: a whole number of degrees, counter-clockwise in the image as
                ``cv2.getRotationMatrix2D`` counts them (90:
                ``cv2.ROTATE_90_COUNTERCLOCKWISE``).

        Returns:
            (N, 128) float32, L2-normalised.
        """
        angle = check_angle(angle)
        return self._steerers.get(self, self._model_file, [angle]).steer(descriptors, angle)

    def getSteerers(self, rotations: int = DEFAULT_ROTATIONS) -> Steerers:
        """This model's steerers for the angles k * 360 / ``rotations`` (fitted on first
        use and cached), for ``cv2r2d2.SteeredMatcher`` and the ``rotations=`` option of
        :mod:`cv2r2d2.matching`."""
        return self._steerers.get(self, self._model_file, rotation_angles(rotations))

    def fitSteerers(self, rotations: int = DEFAULT_ROTATIONS,
                    images: Optional[Union[str, os.PathLike]] = None) -> Steerers:
        """Fit this model's steerers for k * 360 / ``rotations`` degrees now, replacing
        the cached ones (on procedural images, or on the images of the folder
        ``images``), and return them."""
        settings = FitSettings(images=None if images is None else os.fspath(images))
        return self._steerers.fit(self, self._model_file, rotation_angles(rotations), settings)

    def _model_file(self) -> Path:
        """The file the network's weights come from (the steerers' cache key)."""
        return model_file(self._config)

    # --- cv2.Feature2D / cv2.Algorithm information ---------------------------------

    def descriptorSize(self) -> int:
        """The descriptor length: 128 floats."""
        return int(self._network.descriptor_size)

    def descriptorType(self) -> int:
        """The descriptor element type: ``cv2.CV_32F``."""
        return cv2.CV_32F

    def defaultNorm(self) -> int:
        """The norm to match descriptors with: ``cv2.NORM_L2``."""
        return cv2.NORM_L2

    def getDefaultName(self) -> str:
        """The algorithm's name, as ``cv2.Algorithm`` gives it: ``"Feature2D.R2D2"``."""
        return "Feature2D.R2D2"

    def empty(self) -> bool:
        """Whether no network is loaded (False once created)."""
        return self._network is None

    def _runner(self) -> NetworkRunner:
        """The network runner (:class:`~cv2r2d2.runner.NetworkRunner`) behind this
        extractor, for the extractor's functions (``extract``, ``describe``...) directly."""
        return self._network

    def __repr__(self) -> str:
        """``R2D2Feature(preset=..., <the arguments that override it>)``: what create() takes
        to give the same extractor."""
        arguments = {"preset": self._config.preset, **self._config.overrides()}
        return "R2D2Feature({})".format(", ".join(f"{k}={v!r}" for k, v in arguments.items()))

    # --- parameters ----------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        """Change create() arguments that need no new network (validated first)."""
        self._config = self._config.replace(**changes)

    def getConfig(self) -> R2D2Config:
        """The configuration: every argument of :meth:`create` (``getConfig().arguments()``
        creates the same extractor)."""
        return self._config

    def getPreset(self) -> str:
        """The name of the preset this extractor started from (see :meth:`create`)."""
        return self._config.preset

    def setPreset(self, preset: str) -> None:
        """Start again from another preset, keeping the arguments that override the
        current one (a network change loads the network again)."""
        self._apply(self._config.replace(preset=preset))

    def getModel(self) -> str:
        """The model: an official name or a checkpoint / ``.onnx`` path."""
        return self._config.model

    def setModel(self, model: Union[str, os.PathLike]) -> None:
        """Load another model (name or checkpoint path)."""
        config = self._config.replace(model=model)
        self._network = _runner_of(config)
        self._config = config
        self._steerers.forget()

    def getDevice(self) -> Optional[str]:
        """The torch device given at creation (None: CUDA when available, else the CPU)."""
        return self._config.device

    def getBackend(self) -> str:
        """The backend running the network: ``torch``, ``reference``, ``onnxruntime`` or ``opencv``."""
        return self._config.backend

    def getNumThreads(self) -> Optional[int]:
        """The ``num_threads`` given at creation (None: not set)."""
        return self._config.num_threads

    def getPrecision(self) -> str:
        """The ``precision`` given at creation (``"auto"`` stays so; the runner's
        ``precision`` attribute, where it has one, says what runs)."""
        return self._config.precision

    def getSubpixel(self) -> Union[bool, str]:
        """Sub-pixel keypoint positions: False (the original's), True (parabola) or ``"descriptor"``."""
        return self._config.subpixel

    def setSubpixel(self, subpixel: Union[bool, str]) -> None:
        """Sub-pixel keypoint positions: False, True (parabola) or "descriptor"."""
        self._set(subpixel=subpixel)

    def getTileSize(self) -> int:
        """Tile side in pixels for large pyramid levels (0: never tile)."""
        return self._config.tile_size

    def setTileSize(self, tile_size: int) -> None:
        """Tile side in pixels for large pyramid levels (0: never tile)."""
        self._set(tile_size=tile_size)

    def getNFeatures(self) -> int:
        """Keypoints kept per image, best first (0: all)."""
        return int(self._config.params.nfeatures)

    def setNFeatures(self, nfeatures: int) -> None:
        """Keep this many keypoints per image, best first (0: all)."""
        self._set(nfeatures=nfeatures)

    def getScaleFactor(self) -> float:
        """Ratio between consecutive pyramid scales (``scale_f``)."""
        return float(self._config.params.scale_f)

    def setScaleFactor(self, scale_f: float) -> None:
        """Set the ratio between consecutive pyramid scales (> 1)."""
        self._set(scale_f=scale_f)

    def getMinSize(self) -> int:
        """Smallest longer side of a pyramid level, pixels."""
        return int(self._config.params.min_size)

    def setMinSize(self, min_size: int) -> None:
        """Set the smallest longer side of a pyramid level, pixels."""
        self._set(min_size=min_size)

    def getMaxSize(self) -> int:
        """Largest longer side of a pyramid level, pixels."""
        return int(self._config.params.max_size)

    def setMaxSize(self, max_size: int) -> None:
        """Set the largest longer side of a pyramid level, pixels."""
        self._set(max_size=max_size)

    def getMinScale(self) -> float:
        """Smallest pyramid scale."""
        return float(self._config.params.min_scale)

    def setMinScale(self, min_scale: float) -> None:
        """Set the smallest pyramid scale."""
        self._set(min_scale=min_scale)

    def getMaxScale(self) -> float:
        """Largest pyramid scale (<= 1: no upscaling)."""
        return float(self._config.params.max_scale)

    def setMaxScale(self, max_scale: float) -> None:
        """Set the largest pyramid scale (<= 1)."""
        self._set(max_scale=max_scale)

    def getReliabilityThreshold(self) -> float:
        """Minimum reliability of a keypoint, in [0, 1]."""
        return float(self._config.params.reliability_thr)

    def setReliabilityThreshold(self, reliability_thr: float) -> None:
        """Set the minimum reliability of a keypoint, in [0, 1]."""
        self._set(reliability_thr=reliability_thr)

    def getRepeatabilityThreshold(self) -> float:
        """Minimum repeatability of a keypoint, in [0, 1]."""
        return float(self._config.params.repeatability_thr)

    def setRepeatabilityThreshold(self, repeatability_thr: float) -> None:
        """Set the minimum repeatability of a keypoint, in [0, 1]."""
        self._set(repeatability_thr=repeatability_thr)

    def getUniqueRadius(self) -> float:
        """Pixels within which keypoints of different levels count as one place (0: off)."""
        return float(self._config.params.unique_radius)

    def setUniqueRadius(self, unique_radius: float) -> None:
        """Suppress cross-level duplicates within this many pixels (0: off)."""
        self._set(unique_radius=unique_radius)

    # --- persistence (cv2.FileStorage) ---------------------------------------------

    def write(self, fs: Union[str, os.PathLike, cv2.FileStorage], name: Optional[str] = None) -> None:
        """Store the settings: ``write(filename)`` or ``write(fs[, name])``.

        Every argument of :meth:`create` is stored (``num_threads=None`` as -1) except
        ``device``: it names this machine's hardware, and a file written on a GPU
        machine must load on any other.
        """
        write_storage(fs, self._write_fields, name)

    def save(self, filename: Union[str, os.PathLike]) -> None:
        """Store the parameters in a YAML/XML/JSON file (as ``write(filename)``)."""
        self.write(filename)

    def _write_fields(self, fs: cv2.FileStorage) -> None:
        fs.write("name", self.getDefaultName())
        self._config.write(fs)

    def read(self, fn: Union[str, os.PathLike, cv2.FileStorage, cv2.FileNode]) -> None:
        """Load settings stored by :meth:`write` (a file name, FileStorage or FileNode).

        Keys that are absent keep their current value (the device always does); a
        different ``model``, ``backend``, ``precision`` or ``num_threads`` loads the network
        again. Nothing changes when a stored value is refused.
        """
        read_storage(fn, self._read_node)

    def _read_node(self, node: cv2.FileNode) -> None:
        if node.empty() or not node.isMap():
            raise ValueError("the R2D2 parameters must be stored as a map (see write())")
        stored_name = node.getNode("name")
        if not stored_name.empty() and stored_name.string() != self.getDefaultName():
            raise ValueError(
                f"the file holds {stored_name.string()!r} parameters, not {self.getDefaultName()!r}"
            )
        self._apply(self._config.read(node))

    def _apply(self, config: R2D2Config) -> None:
        """Take ``config``, with a new network when one of its settings changed."""
        runner = self._network
        if any(getattr(config, key) != getattr(self._config, key) for key in _NETWORK):
            runner = _runner_of(config)
            self._steerers.forget()
        self._network, self._config = runner, config


def R2D2_create(nfeatures: int = PRESET, **kwargs: Any) -> R2D2Feature:
    """``cv2.SIFT_create``-style factory: ``R2D2_create(5000)`` as ``SIFT_create(5000)``.

    The first positional argument is ``nfeatures``; every other parameter of
    :meth:`R2D2Feature.create` (``model``, ``device``...) is a keyword.
    """
    return R2D2Feature.create(nfeatures=nfeatures, **kwargs)
