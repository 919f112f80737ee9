"""Named settings: every preset is a valid configuration, explicit arguments win, the
preset survives write()/read() and repr, and the command line lists and applies them."""
from __future__ import annotations

import types

import pytest

import cv2r2d2
from cv2r2d2.cli import main
from cv2r2d2.config import R2D2Config
from cv2r2d2.presets import DEFAULT_PRESET, PRESETS, SFM_PRESET, get_preset


@pytest.fixture
def no_network(monkeypatch):
    """Extractors without loading a network (the runner's arguments are recorded)."""
    from cv2r2d2 import feature2d

    built = []

    def make_runner(*args, **kwargs):
        built.append((args, kwargs))
        return types.SimpleNamespace(descriptor_size=128)

    monkeypatch.setattr(feature2d, "_make_runner", make_runner)
    return built


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_configuration(name):
    preset = get_preset(name)
    config = R2D2Config.from_arguments(preset=name)
    assert config.preset == name and preset.purpose and preset.figures
    for key, value in preset.extraction.items():
        assert config.arguments()[key] == value
    assert set(preset.matching) <= {"max_distance", "ratio"}
    if preset.refinement is not None:
        from cv2r2d2.refinement import RefinementParams

        RefinementParams.upsampled(preset.refinement.get("upsample", 1.0))
        config.replace(**preset.refinement.get("network", {}))


def test_paper_is_the_default_and_the_papers_settings():
    assert DEFAULT_PRESET == "paper" and SFM_PRESET == "sfm"
    assert R2D2Config() == R2D2Config.from_arguments()
    assert R2D2Config.from_arguments(preset="paper") == R2D2Config()
    assert not PRESETS["paper"].extraction and PRESETS["paper"].refinement is None


def test_explicit_arguments_win_over_the_preset(no_network):
    ratio = cv2r2d2.R2D2Feature.create(preset="ratio", nfeatures=1000)
    assert ratio.getUniqueRadius() == 2.0 and ratio.getNFeatures() == 1000
    # An explicit value equal to the paper's still overrides the preset's.
    back = cv2r2d2.R2D2Feature.create(preset="ratio", unique_radius=0.0)
    assert back.getUniqueRadius() == 0.0
    assert repr(back) == "R2D2Feature(preset='ratio', unique_radius=0.0)"
    accurate = cv2r2d2.R2D2_create(1000, preset="accurate")
    assert accurate.getSubpixel() == "descriptor" and accurate.getNFeatures() == 1000
    assert cv2r2d2.R2D2_create(preset="ratio").getNFeatures() == 5000


def test_unknown_preset_lists_the_known_ones(no_network):
    with pytest.raises(ValueError, match="paper, ratio, accurate, sfm"):
        cv2r2d2.R2D2Feature.create(preset="fastest")
    with pytest.raises(ValueError, match="unknown preset"):
        R2D2Config(preset=3)


def test_preset_and_overrides_survive_write_read_and_repr(no_network, tmp_path):
    written = cv2r2d2.R2D2Feature.create(preset="ratio", nfeatures=1000, subpixel=True)
    assert repr(written) == "R2D2Feature(preset='ratio', nfeatures=1000, subpixel=True)"
    path = tmp_path / "r2d2.yml"
    written.write(str(path))
    reader = cv2r2d2.R2D2Feature.create()
    reader.read(str(path))
    assert repr(reader) == repr(written) and reader.getPreset() == "ratio"
    assert reader.getConfig() == written.getConfig()
    # Another preset keeps the overrides of the first.
    reader.setPreset("accurate")
    assert repr(reader) == "R2D2Feature(preset='accurate', nfeatures=1000, subpixel=True)"
    # A file written before presets existed (no preset key) keeps the reader's preset.
    text = path.read_text().replace("preset: ratio\n", "")
    path.write_text(text)
    old = cv2r2d2.R2D2Feature.create()
    old.read(str(path))
    assert old.getPreset() == "paper" and old.getUniqueRadius() == 2.0


def test_cli_lists_the_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"\n{name}" in "\n" + out and preset.purpose in out
    assert "(default of sfm)" in out


def test_cli_options_override_the_preset_and_only_those_given():
    from cv2r2d2.cli import build_parser
    from cv2r2d2.cli.options import feature_config

    parse = build_parser().parse_args
    config = feature_config(parse(["extract", "x.png", "-o", "f.h5", "--preset", "ratio",
                                   "--nfeatures", "10"]))
    assert (config.preset, config.params.nfeatures, config.params.unique_radius) == ("ratio", 10, 2.0)
    assert feature_config(parse(["extract", "x.png", "-o", "f.h5"])) == R2D2Config()
    sfm = parse(["sfm", "in", "out", "--no-subpixel"])
    assert feature_config(sfm, SFM_PRESET) == R2D2Config.from_arguments(preset="sfm",
                                                                         subpixel=False)
    paper = parse(["sfm", "in", "out", "--preset", "paper"])
    assert feature_config(paper, SFM_PRESET) == R2D2Config()
    with pytest.raises(SystemExit):
        parse(["extract", "x.png", "-o", "f.h5", "--preset", "nope"])
