"""The pycolmap layer (cv2r2d2.colmap): database writing and mapper options.

The database's verification, reading back and keypoint updates run on a rendered scene
in tests/test_sfm.py.
"""
from __future__ import annotations

import pytest

pycolmap = pytest.importorskip("pycolmap")

from cv2r2d2.colmap import check_camera_mode, pipeline_options, write_database  # noqa: E402


def test_write_database_refuses_an_existing_file(tmp_path):
    (tmp_path / "database.db").write_bytes(b"SQLite format 3")
    with pytest.raises(FileExistsError):
        write_database(tmp_path / "database.db", tmp_path, None, None, [])


def test_write_database_refuses_an_unknown_camera_mode(tmp_path):
    with pytest.raises(ValueError, match="camera_mode must be one of auto, single"):
        write_database(tmp_path / "database.db", tmp_path, None, None, [], camera_mode="one")
    assert check_camera_mode("per_folder") == "per_folder"


def test_mapper_options_as_hloc_passes_them():
    options = pipeline_options({"min_model_size": 3, "ba_refine_focal_length": False,
                                "mapper": {"init_min_num_inliers": 50}})
    assert isinstance(options, pycolmap.IncrementalPipelineOptions)
    assert options.min_model_size == 3 and not options.ba_refine_focal_length
    assert options.mapper.init_min_num_inliers == 50
    default = pycolmap.IncrementalPipelineOptions()
    assert pipeline_options().todict() == default.todict()
    assert options.mapper.init_max_error == default.mapper.init_max_error


@pytest.mark.parametrize("options, error, match", [
    ({"min_modelsize": 3}, ValueError, r"mapper_options: IncrementalPipelineOptions has no "
                                       r"option 'min_modelsize'; its options are .*min_model_size"),
    ({"mapper": {"nope": 1}}, ValueError, r"mapper_options\['mapper'\]: "
                                          r"IncrementalMapperOptions has no option 'nope'"),
    ({"min_model_size": "3"}, ValueError,
     r"option 'min_model_size' takes int values \(default 10\)"),
    ({"mapper": 3}, ValueError, r"option 'mapper' takes IncrementalMapperOptions values"),
    ([("min_model_size", 3)], TypeError, "mapper_options must be a dict"),
])
def test_unknown_mapper_options_are_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        pipeline_options(options)
