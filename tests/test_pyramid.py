"""The pyramid levels: the reference's, and scale 1 where it has none."""
from __future__ import annotations

import pytest

from cv2r2d2.params import ExtractionParams
from cv2r2d2.pyramid import Level, pyramid, reference_pyramid


def test_paper_pyramid_of_brooklyn():
    steps = pyramid(820, 1280, ExtractionParams())
    levels = [s for s in steps if s.processed]
    assert [s.octave for s in levels] == list(range(2, 10))
    assert (levels[0].height, levels[0].width) == (580, 905)
    assert all(s.processed for s in steps[2:]) and not steps[0].processed
    assert levels[0].size == pytest.approx(32 * 2**0.5)
    area = sum(s.height * s.width for s in levels)
    assert 1.6e6 < area < 1.75e6  # 1.68 Mpx, as measured for the reference


def test_fullres_pyramid_and_tiny_images():
    params = ExtractionParams(min_size=0, max_size=9999, min_scale=0.3)
    levels = pyramid(576, 768, params)
    assert levels[0].scale == 1.0 and levels[-1].scale >= 0.3 - 1e-3
    assert len(levels) == 7
    # Smaller than min_size: the reference has no level; the image runs at its own size.
    assert reference_pyramid(10, 12, ExtractionParams()) == []
    assert pyramid(10, 12, ExtractionParams()) == [Level(0, 1.0, 10, 12)]
    assert pyramid(2, 2, ExtractionParams()) == [Level(0, 1.0, 2, 2)]
    for height, width in ((1, 300), (300, 1), (1, 1)):  # too thin for the network
        assert pyramid(height, width, ExtractionParams()) == []
    assert reference_pyramid(1, 300, ExtractionParams(min_size=0)) == []
    # An image with a level keeps the reference's pyramid (parity).
    for height, width in ((820, 1280), (200, 256), (300, 40)):
        assert pyramid(height, width, ExtractionParams()) == \
            reference_pyramid(height, width, ExtractionParams()) != []
