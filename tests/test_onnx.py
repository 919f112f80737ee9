"""ONNX export and the torch-free backends (cv2r2d2.export, cv2r2d2.onnx_runner)."""
from __future__ import annotations

import ast
import importlib.util
import json
import logging
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

import cv2r2d2
from conftest import image_path, missing, read_image, reference_file, weights_file
from cv2r2d2.extractor import extract
from cv2r2d2.params import ExtractionParams
from cv2r2d2.image import normalize_image
from cv2r2d2.backends import make_onnx_runner
from cv2r2d2.config import NUM_THREADS_ENV
from cv2r2d2.onnx_runner import (
    ALIGNMENT_KEY, HALO_KEY, OUTPUT_NAMES, OnnxRuntimeRunner, read_metadata,
)
from cv2r2d2.weights import CACHE_DIR_ENV, MODELS, WEIGHTS_DIR_ENV, WeightsError, find_onnx_model
from cv2r2d2.evaluation import parity_figures

MODEL = "r2d2_WASF_N16"
BACKENDS = ["onnxruntime", "opencv"]
# Three pyramid levels of a 301 x 257 crop, run on tiles of 96 x 96 map pixels or whole.
TILE_PARAMS = ExtractionParams(min_size=0, max_size=9999, min_scale=0.6, nfeatures=1000)
TILE_SIZE = 96


def _need(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            missing(f"the {module} package (pip install cv2r2d2[onnx])")


@pytest.fixture(scope="session")
def onnx_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def crop(peppers):
    # Odd sizes on purpose: the Fast network's map is one pixel smaller there.
    return normalize_image(peppers[100:401, 50:307])


@pytest.fixture(scope="session")
def exported(onnx_folder):
    """export(model) -> the fp32 export's report, each model exported once."""
    reports = {}

    def export(model: str = MODEL) -> dict:
        _need("onnx", "onnxruntime")
        weights_file(model)
        if model not in reports:
            from cv2r2d2.export import export_onnx

            reports[model] = export_onnx(model, onnx_folder / f"{model}.onnx")
        return reports[model]

    return export


def _reference(name: str):
    """A reference file and its extraction parameters, as create() keywords."""
    reference = np.load(reference_file(name))
    params = ast.literal_eval(str(reference["params"]))
    params["nfeatures"] = params.pop("top_k")
    return reference, params


def _record_inputs(runner, monkeypatch) -> list:
    """The (H, W) of each input the runner's graph will run on, filled in as it runs."""
    sizes = []
    forward = runner._forward

    def recorded(batch):
        sizes.append(batch.shape[2:])
        return forward(batch)

    monkeypatch.setattr(runner, "_forward", recorded)
    return sizes


def _assert_tiles_equal_whole(runner, crop, monkeypatch) -> None:
    """Tiled extraction runs on small crops and gives the untiled keypoints and maps."""
    whole = extract(runner, crop, TILE_PARAMS, tile_size=0)
    sizes = _record_inputs(runner, monkeypatch)
    tiled = extract(runner, crop, TILE_PARAMS, tile_size=TILE_SIZE)
    assert len(sizes) > 3 and max(h * w for h, w in sizes) <= 2 * TILE_SIZE**2, sizes
    assert len(tiled) == len(whole) > 100
    np.testing.assert_array_equal(tiled.xy, whole.xy)
    np.testing.assert_array_equal(tiled.sizes, whole.sizes)
    np.testing.assert_allclose(tiled.scores, whole.scores, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tiled.descriptors, whole.descriptors, atol=1e-5, rtol=0)
    handle = runner.prepare(crop)
    maps = runner.run(handle)
    map_h, map_w = runner.output_size(*crop.shape[1:])
    for y0, y1, x0, x1 in [(0, 90, 0, 80), (100, 200, 50, 150), (200, map_h, 150, map_w)]:
        part = runner.run(handle, (y0, y1, x0, x1))
        for key in ("reliability", "repeatability"):
            np.testing.assert_allclose(getattr(part, key), getattr(maps, key)[y0:y1, x0:x1],
                                       atol=1e-5, rtol=0, err_msg=key)
        np.testing.assert_allclose(part.dense_descriptors(),
                                   maps.dense_descriptors()[:, y0:y1, x0:x1], atol=1e-5, rtol=0)


def _assert_parity(figures: dict, count: int) -> None:
    assert figures["count"] == (count, count)
    assert figures["overlap"] >= 0.995
    assert figures["max_score_error"] <= 1e-4
    assert figures["min_cosine"] >= 0.9999


def test_export_passes_checker_with_metadata_and_dynamic_size(exported):
    import onnx

    report = exported()
    model = onnx.load(report["output"])
    onnx.checker.check_model(model, full_check=True)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["cv2r2d2.model"] == MODEL
    assert metadata["cv2r2d2.licence"] == MODELS[MODEL].licence
    assert metadata["cv2r2d2.precision"] == "fp32"
    assert json.loads(metadata["cv2r2d2.extraction_defaults"]) == ExtractionParams().as_dict()
    assert (metadata[HALO_KEY], metadata[ALIGNMENT_KEY]) == ("27", "1")  # torch_runner's halo
    # The torch-free reader (used by cv2.dnn) and ONNX Runtime's see the same metadata.
    assert read_metadata(report["output"]) == metadata
    assert OnnxRuntimeRunner(report["output"]).session.get_modelmeta().custom_metadata_map == metadata
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    shape = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in shape[2:]] == ["height", "width"]
    # No head activation inside the graph (cv2.dnn's NaN); BatchNorm folded away.
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Softplus", "Softmax", "Div", "BatchNormalization"}
    assert report["precision"] == "fp32" and report["max_abs_error"] < 1e-3


@pytest.mark.slow  # an ONNX export, full-size parity
def test_onnxruntime_extracts_without_torch_and_matches_reference(exported, tmp_path):
    report = exported()
    reference, params = _reference(f"{MODEL}__boat__default.npz")
    result = tmp_path / "features.npz"
    script = textwrap.dedent(f"""
        import sys
        import cv2
        import numpy as np
        import cv2r2d2

        r2d2 = cv2r2d2.R2D2Feature.create(model={report['output']!r}, backend="onnxruntime", **{params!r})
        keypoints, descriptors = r2d2.detectAndCompute(cv2.imread({str(image_path('boat.png'))!r}), None)
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
        np.savez({str(result)!r}, descriptors=descriptors,
                 keypoints=np.array([(k.pt[0], k.pt[1], k.size, k.response) for k in keypoints]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    ours = np.load(result)
    keypoints = [cv2.KeyPoint(x, y, size, -1, response) for x, y, size, response in ours["keypoints"]]
    _assert_parity(parity_figures(keypoints, ours["descriptors"], reference), len(reference["scores"]))


@pytest.mark.slow  # an ONNX export, full-size parity
def test_opencv_backend_matches_reference(exported):
    reference, params = _reference(f"{MODEL}__boat__default.npz")
    r2d2 = cv2r2d2.R2D2Feature.create(model=exported()["output"], backend="opencv", **params)
    keypoints, descriptors = r2d2.detectAndCompute(read_image("boat.png"), None)
    _assert_parity(parity_figures(keypoints, descriptors, reference), len(reference["scores"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", [MODEL, "faster2d2_WASF_N16"])
def test_dense_maps_match_reference(exported, backend, model):
    reference = np.load(reference_file(f"{model}__peppers_crop__dense.npz"))
    crop = cv2.imread(str(reference_file("peppers_crop_96x128.png")))
    r2d2 = cv2r2d2.R2D2Feature.create(model=exported(model)["output"], backend=backend)
    maps = r2d2.computeDenseMaps(crop)
    for key in ("descriptors", "reliability", "repeatability"):
        assert maps[key].dtype == np.float32
        np.testing.assert_allclose(maps[key], reference[key], atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.parametrize("backend, model", [("onnxruntime", MODEL), ("opencv", MODEL),
                                            ("onnxruntime", "faster2d2_WASF_N16")])
@pytest.mark.slow  # ONNX exports and full-size extractions
def test_tiles_run_on_crops_and_give_the_untiled_keypoints(exported, crop, backend, model,
                                                          monkeypatch):
    runner = make_onnx_runner(exported(model)["output"], backend=backend)
    assert runner.halo == (27 if model == MODEL else 30)
    _assert_tiles_equal_whole(runner, crop, monkeypatch)


@pytest.mark.slow  # an ONNX export, full-size extraction
def test_export_without_halo_metadata_runs_levels_whole(exported, crop, tmp_path, caplog,
                                                        monkeypatch):
    import onnx

    expected = extract(make_onnx_runner(exported()["output"]), crop, TILE_PARAMS, tile_size=0)
    model = onnx.load(exported()["output"])
    older = [(p.key, p.value) for p in model.metadata_props if p.key not in (HALO_KEY, ALIGNMENT_KEY)]
    del model.metadata_props[:]
    for key, value in older:
        model.metadata_props.add(key=key, value=value)
    old_path = tmp_path / "older.onnx"
    onnx.save(model, str(old_path))
    for backend in BACKENDS:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cv2r2d2.onnx_runner"):
            runner = make_onnx_runner(old_path, backend=backend)
            sizes = _record_inputs(runner, monkeypatch)
            features = extract(runner, crop, TILE_PARAMS, tile_size=TILE_SIZE)
        warnings = [r.getMessage() for r in caplog.records if r.name == "cv2r2d2.onnx_runner"]
        assert runner.halo is None and len(warnings) == 1 and "export it again" in warnings[0]
        # One whole-level run per level (three), not tiles of it; the same keypoints.
        assert len(sizes) == 3 and sizes[0] == crop.shape[1:], sizes
        np.testing.assert_array_equal(features.xy, expected.xy)
        np.testing.assert_allclose(features.descriptors, expected.descriptors, atol=1e-5, rtol=0)
    # Metadata that contradicts the graph (not pooled) is refused, not trusted.
    model.metadata_props.add(key=HALO_KEY, value="28")
    model.metadata_props.add(key=ALIGNMENT_KEY, value="2")
    onnx.save(model, str(old_path))
    for backend in BACKENDS:
        with pytest.raises(WeightsError, match=ALIGNMENT_KEY):
            make_onnx_runner(old_path, backend=backend)
    (tmp_path / "broken.onnx").write_bytes(b"\xff" * 16)
    with pytest.raises(WeightsError, match="not a readable ONNX file"):
        read_metadata(tmp_path / "broken.onnx")


@pytest.mark.slow  # an ONNX export, full-size extraction
def test_compute_at_given_keypoints_matches_torch_backend(exported, boat):
    # Off-grid positions and several sizes: bilinear sampling on both pyramid levels.
    crop = boat[96:416, 96:416]
    keypoints = cv2.SIFT_create(300).detect(crop, None)
    torch_kept, expected = cv2r2d2.R2D2Feature.create(device="cpu").compute(crop, keypoints)
    for backend in BACKENDS:
        r2d2 = cv2r2d2.R2D2Feature.create(model=exported()["output"], backend=backend)
        kept, descriptors = r2d2.compute(crop, keypoints)
        assert [k.pt for k in kept] == [k.pt for k in torch_kept]
        assert np.einsum("ij,ij->i", descriptors, expected).min() >= 0.9999, backend


def test_nothing_detected_gives_empty_result(exported):
    r2d2 = cv2r2d2.R2D2Feature.create(model=exported()["output"], backend="onnxruntime")
    assert r2d2.detectAndCompute(np.full((256, 256), 128, np.uint8), None) == ((), None)
    assert r2d2.descriptorSize() == 128


def test_session_has_arena_off_and_requested_threads(exported, monkeypatch):
    path = exported()["output"]
    options = OnnxRuntimeRunner(path, num_threads=1).session.get_session_options()
    assert options.enable_cpu_mem_arena is False
    assert options.intra_op_num_threads == 1
    monkeypatch.setenv(NUM_THREADS_ENV, "2")
    assert make_onnx_runner(path).session.get_session_options().intra_op_num_threads == 2
    r2d2 = cv2r2d2.R2D2Feature.create(model=path, backend="onnxruntime", num_threads=1)
    assert r2d2.getNumThreads() == 1
    assert r2d2._runner().session.get_session_options().intra_op_num_threads == 1
    assert cv2r2d2.R2D2_create(model=path, backend="opencv", num_threads=1)._runner().num_threads == 1
    with pytest.raises(ValueError, match="num_threads"):
        make_onnx_runner(path, num_threads=-1)
    with pytest.raises(TypeError, match="num_threads"):
        cv2r2d2.R2D2Feature.create(model=path, backend="onnxruntime", num_threads=1.5)
    monkeypatch.setenv(NUM_THREADS_ENV, "many")
    with pytest.raises(ValueError, match=NUM_THREADS_ENV):
        make_onnx_runner(path)


def test_registry_name_finds_export_in_weights_dir(exported, tmp_path, monkeypatch):
    (tmp_path / f"{MODEL}.onnx").symlink_to(exported()["output"])
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert find_onnx_model(MODEL) == tmp_path / f"{MODEL}.onnx"


def test_registry_name_is_exported_once_into_the_cache(tmp_path, monkeypatch):
    _need("onnx", "onnxruntime")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / f"{MODEL}.pt").symlink_to(weights_file(MODEL))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(weights))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    runner = make_onnx_runner(MODEL)
    cached = tmp_path / "cache" / f"{MODEL}.onnx"
    assert runner.path == cached and cached.is_file()
    assert [p.name for p in cached.parent.iterdir() if p.suffix == ".onnx"] == [cached.name]
    stamp = cached.stat().st_mtime_ns
    assert make_onnx_runner(MODEL, backend="opencv").path == cached
    assert cached.stat().st_mtime_ns == stamp


def test_bad_arguments_are_refused(exported, tmp_path):
    from cv2r2d2.export import export_onnx

    with pytest.raises(ValueError, match=r"\.onnx"):
        make_onnx_runner(weights_file(MODEL))
    with pytest.raises(WeightsError, match="neither"):
        make_onnx_runner(tmp_path / "absent.onnx")
    with pytest.raises(ValueError, match="backend"):
        make_onnx_runner(exported()["output"], backend="tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        make_onnx_runner(exported()["output"], backend="opencv", device="cuda")
    with pytest.raises(ValueError, match="calibration"):
        export_onnx(MODEL, tmp_path / "a.onnx", int8=True)
    with pytest.raises(ValueError, match="no readable image"):
        export_onnx(MODEL, tmp_path / "a.onnx", int8=True, calibration=tmp_path)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(MODEL, tmp_path / "a.onnx", opset=7)
    cv2.imwrite(str(tmp_path / "one.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        export_onnx(MODEL, tmp_path / "a.onnx", int8=True, calibration=tmp_path)
    assert not (tmp_path / "a.onnx").exists()


def test_int8_accuracy_is_measured_on_held_out_images():
    from cv2r2d2.export import EVALUATION_IMAGES, held_out

    for count, expected in ((2, 1), (9, 1), (10, 2), (19, 3), (40, EVALUATION_IMAGES)):
        images = [np.full((4, 4), i, np.uint8) for i in range(count)]
        calibrate, evaluate = held_out(images)
        assert len(evaluate) == expected and len(calibrate) == count - expected
        assert sorted(int(i[0, 0]) for i in calibrate + evaluate) == list(range(count))


@pytest.mark.slow  # an int8 build
def test_int8_export_keeps_first_conv_and_heads_fp32_and_reports_its_accuracy(exported, onnx_folder, tmp_path, crop,
                                                               monkeypatch):
    import onnx

    from cv2r2d2.export import export_onnx

    import cv2r2d2.onnx_export as export

    exported()
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    boat = read_image("boat.png")[128:384, 128:384]
    peppers = cv2.resize(read_image("peppers.png"), (256, 256))
    cv2.imwrite(str(calibration / "boat.png"), boat)
    cv2.imwrite(str(calibration / "peppers.png"), peppers)
    seen, bars = {}, []
    for name in ("quantize_int8", "int8_report"):
        def spy(*args, _name=name, _function=getattr(export, name)):
            seen[_name] = args[2]
            return _function(*args)
        monkeypatch.setattr(export, name, spy)
    monkeypatch.setattr(export, "progress", lambda items, total, enabled, desc, unit:
                        bars.append((total, enabled, desc, unit)) or items)
    report = export_onnx(MODEL, onnx_folder / "int8.onnx", int8=True, calibration=calibration,
                         show_progress=True)
    print(report)

    # Calibrated on boat, measured on the held-out peppers: int8 against fp32.
    assert [image.shape for image in seen["quantize_int8"]] == [boat.shape]
    assert len(seen["int8_report"]) == 1 and np.array_equal(seen["int8_report"][0], peppers)
    assert bars == [(1, True, "calibrate", "image"), (1, True, "int8 vs fp32", "image")]
    assert report["precision"] == "int8" and "max_abs_error" not in report
    assert report["calibration_images"] == 1 and report["evaluation_images"] == 1
    assert report["fp32_max_abs_error"] < 1e-3
    assert report["keypoints_within_2px"] >= 0.9
    assert report["descriptor_cosine_median"] >= 0.98
    assert report["mma3_int8"] >= report["mma3_fp32"] - 0.05
    assert report["bytes"] < 0.5 * exported()["bytes"]
    model = onnx.load(report["output"])
    onnx.checker.check_model(model, full_check=True)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["cv2r2d2.precision"] == "int8"
    assert (metadata[HALO_KEY], metadata[ALIGNMENT_KEY]) == ("27", "1")
    assert read_metadata(report["output"]) == metadata
    heads = [n for n in model.graph.node if n.name in ("/clf/Conv", "/sal/Conv")]
    float_weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert len(heads) == 2 and all(n.input[1] in float_weights for n in heads)
    # The first convolution reads the fp32 image with fp32 weights; the others are quantised.
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    first = [n for n in convs if n.input[0] == "image"]
    assert len(first) == 1 and first[0].input[1] in float_weights
    quantised = [n for n in convs if n.input[1] not in float_weights]
    assert len(quantised) == len(convs) - 3
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)

    r2d2 = cv2r2d2.R2D2Feature.create(model=report["output"], backend="onnxruntime", nfeatures=500)
    keypoints, descriptors = r2d2.detectAndCompute(read_image("test.png")[:256, :320], None)
    assert len(keypoints) > 100
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    # The quantised graph crops as exactly: its quantisation steps are per-pixel.
    _assert_tiles_equal_whole(r2d2._runner(), crop, monkeypatch)


def test_sfm_refine_model_runs_an_onnx_export_on_onnxruntime(exported):
    """`cv2r2d2 sfm --refine --refine-model x.onnx`: the refinement's extractor runs that
    file on onnxruntime with the extraction's settings; a checkpoint or registry name on
    torch; --refine-upsample 2 gives RefinementParams.upsampled(2)."""
    from cv2r2d2.cli import build_parser
    from cv2r2d2.cli.options import feature_config
    from cv2r2d2.cli.reconstruction import _refinement
    from cv2r2d2.refinement import RefinementParams

    path = exported()["output"]
    args = build_parser().parse_args(
        ["sfm", "photos", "out", "--refine", "--refine-model", str(path), "--refine-upsample",
         "2", "--max-size", "640", "--backend", "torch", "--device", "cpu"])
    refinement = _refinement(args, feature_config(args))
    assert refinement.enabled and refinement.params == RefinementParams.upsampled(2)
    feature = refinement.feature
    assert feature.getModel() == str(path) and feature.getBackend() == "onnxruntime"
    assert feature.getConfig().params.max_size == 640
    args = build_parser().parse_args(["sfm", "photos", "out", "--refine", "--device", "cpu",
                                      "--refine-model", MODEL, "--backend", "onnxruntime"])
    refinement = _refinement(args, feature_config(args))
    feature = refinement.feature
    assert refinement.params is None and feature.getBackend() == "torch" \
        and feature.getModel() == MODEL
