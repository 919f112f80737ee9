"""Settings and reports of the collection tools; extraction and matching themselves are
tested through the command line (test_cli.py), against OpenCV (test_matching.py) and on
Ray (test_distributed.py)."""
from __future__ import annotations

import pickle

import pytest

from cv2r2d2.collection import ExtractionReport, MatchingReport, MatchingSettings


@pytest.mark.parametrize("arguments, error, message", [
    (dict(max_distance=-1.0), ValueError, "max_distance must be >= 0 or None, got -1.0"),
    (dict(ratio=0.0), ValueError, r"ratio must lie in \(0, 1\] or be None, got 0.0"),
    (dict(ratio=1.5), ValueError, r"ratio must lie in \(0, 1\] or be None, got 1.5"),
    (dict(rotations=7), ValueError, "rotations must be a positive divisor of 360"),
    (dict(rotations=True), ValueError, "rotations must be a positive divisor of 360"),
    (dict(device=0), TypeError, "device must be None or a string"),
])
def test_matching_settings_are_checked_when_made(arguments, error, message):
    with pytest.raises(error, match=message):
        MatchingSettings(**arguments)


def test_matching_settings_record_all_but_the_device():
    import numpy as np

    settings = MatchingSettings(max_distance=0.9, ratio=0.8, rotations=np.int64(12),
                                device="cpu")
    assert type(settings.rotations) is int
    record = settings.record({"kind": "features"})
    assert record["settings"] == dict(max_distance=0.9, ratio=0.8, rotations=12)
    assert record == MatchingSettings(0.9, 0.8, 12).record({"kind": "features"})
    # What the Ray tasks receive is what was made.
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_reports_give_their_throughput():
    assert ExtractionReport(extracted=["a", "b", "c"], seconds=2.0).throughput() == \
        "3 image(s) in 2.0 s: 1.50 images/s"
    assert ExtractionReport(extracted=["a"], seconds=2.0).images_per_second == 0.5
    assert MatchingReport().throughput() == "0 pair(s) in 0.0 s: 0.00 pairs/s"
