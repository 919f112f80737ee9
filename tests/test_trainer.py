"""The trainer: short CPU runs that must improve matching, keep fine-tuned weights good,
write checkpoints the extractor loads, and resume exactly after an interruption.

Accuracy is the mean matching accuracy at 3 px (MMA@3) of mutual nearest-neighbour
matches on held-out synthetic pairs made from an image the training never sees.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cv2r2d2.extractor import extract
from cv2r2d2.params import ExtractionParams
from cv2r2d2.image import normalize_image
from cv2r2d2.nets import build_net
from cv2r2d2.torch_runner import TorchRunner
from cv2r2d2.train.data import PairDataset, SyntheticPairs, collate
from cv2r2d2.train.losses import default_loss
from cv2r2d2.cli import train_main as main
from cv2r2d2.train.trainer import TrainConfig, Trainer, resume_path, save_model, train
from cv2r2d2.weights import load_model

from conftest import image_path, weights_file

logger = logging.getLogger(__name__)

SMALL_NET = "Quad_L2Net_ConfCFS(mchan=1, dim=32)"
TRAIN_IMAGES = ("brooklyn.png", "peppers.png", "test.png")
HELD_OUT_IMAGE = "boat.png"
# Small crops and images keep a step around a CPU second; the paper's are 192 and 256-1024.
CROP, SCALE = 64, (96, 192)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared two-core machine two threads spin-wait for each
    other and the same steps cost several times more CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    """A folder of training images (links to the samples, the held-out one excluded)."""
    folder = tmp_path_factory.mktemp("train_images")
    for name in TRAIN_IMAGES:
        (folder / name).symlink_to(image_path(name))
    return folder


@pytest.fixture(scope="module")
def held_out():
    """Sixteen 128 x 128 synthetic pairs (tilt, noise, jitter) of the held-out image."""
    dataset = PairDataset([SyntheticPairs([image_path(HELD_OUT_IMAGE)], scale=SCALE)],
                          crop=128, scale=SCALE, seed=12345)
    return [dataset.sample(0, dataset.rng(0, position)) for position in range(16)]


def mma(net, pairs, nfeatures: int = 200, threshold: float = 3.0) -> float:
    """Mean over pairs of the fraction of mutual nearest-neighbour matches within
    ``threshold`` px of the true target (single scale, best ``nfeatures`` keypoints)."""
    runner = TorchRunner(net, "cpu")
    params = ExtractionParams(min_size=0, min_scale=1.0, max_scale=1.0, reliability_thr=0.0,
                              repeatability_thr=0.0, nfeatures=nfeatures)
    accuracies = []
    for pair in pairs:
        features1 = extract(runner, normalize_image(pair.image1), params)
        features2 = extract(runner, normalize_image(pair.image2), params)
        similarity = features1.descriptors @ features2.descriptors.T
        forward, backward = similarity.argmax(1), similarity.argmax(0)
        matched = np.flatnonzero(backward[forward] == np.arange(len(forward)))
        if not len(matched):
            accuracies.append(0.0)
            continue
        xy1 = np.round(features1.xy[matched]).astype(int)
        target = pair.aflow[:, xy1[:, 1], xy1[:, 0]].T  # NaN: no true match exists
        error = np.linalg.norm(target - features2.xy[forward[matched]], axis=1)
        accuracies.append(float(np.mean(np.nan_to_num(error, nan=np.inf) <= threshold)))
    return float(np.mean(accuracies))


def held_out_loss(net, pairs) -> float:
    """The training objective on the held-out pairs (fixed random draws)."""
    batch = collate(
        {"image1": torch.from_numpy(normalize_image(p.image1)),
         "image2": torch.from_numpy(normalize_image(p.image2)),
         "aflow": torch.from_numpy(p.aflow)} for p in pairs
    )
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        loss, _ = default_loss()(net(batch["image1"]), net(batch["image2"]), batch["aflow"])
    return float(loss)


def small_config(tmp_path: Path, folder: Path, **overrides) -> TrainConfig:
    settings = dict(images=[str(folder)], output=str(tmp_path / "r2d2.pt"), net=SMALL_NET,
                    crop=CROP, scale=SCALE, workers=0, progress=False, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, train_folder):
    """40 steps of 8 pairs from scratch (lr 1e-3 to learn in so few steps), and the
    untrained network (the same seeded initialisation) as a checkpoint."""
    folder = tmp_path_factory.mktemp("scratch")
    config = small_config(folder, train_folder, epochs=1, batch_size=8, epoch_size=320, lr=1e-3)
    rng_before = torch.get_rng_state()
    output = train(config)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        untrained = build_net(SMALL_NET)
    save_model(untrained, SMALL_NET, folder / "untrained.pt")
    return folder / "untrained.pt", output


@pytest.mark.slow  # 40 training steps
def test_training_from_scratch_lowers_the_loss_and_raises_mma(scratch_run, held_out):
    untrained_path, trained_path = scratch_run
    untrained, trained = load_model(untrained_path, "cpu"), load_model(trained_path, "cpu")
    loss_before, loss_after = held_out_loss(untrained, held_out), held_out_loss(trained, held_out)
    mma_before, mma_after = mma(untrained, held_out), mma(trained, held_out)
    logger.info("from scratch: held-out loss %.4f -> %.4f, MMA@3 %.3f -> %.3f",
                loss_before, loss_after, mma_before, mma_after)
    assert loss_after < loss_before
    assert mma_after > mma_before + 0.1


@pytest.mark.slow  # 40 training steps
def test_checkpoint_has_the_official_format_and_loads_in_the_extractor(scratch_run, boat):
    _, trained_path = scratch_run
    checkpoint = torch.load(trained_path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"net", "state_dict"} and checkpoint["net"] == SMALL_NET
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
    import cv2r2d2

    r2d2 = cv2r2d2.R2D2Feature.create(model=trained_path, device="cpu")
    keypoints, descriptors = r2d2.detectAndCompute(boat[:128, :128], None)
    assert descriptors is None or descriptors.shape[1] == 32
    # The resume file is a loadable checkpoint too, with the training state beside it.
    resumable = torch.load(resume_path(str(trained_path)), map_location="cpu", weights_only=True)
    assert {"net", "state_dict", "training"} <= set(resumable)
    load_model(resume_path(str(trained_path)), "cpu")


@pytest.mark.slow  # training the official network
def test_fine_tuning_the_official_weights_keeps_their_accuracy(tmp_path, train_folder, held_out):
    pretrained = weights_file("r2d2_WASF_N16")
    # 4 steps at the paper's lr; crops of 96 px, as smaller ones are mostly the
    # convolutions' zero padding to this network's large receptive field.
    config = small_config(tmp_path, train_folder, net=None, pretrained=str(pretrained),
                          crop=96, epochs=1, batch_size=4, epoch_size=16)
    before = mma(load_model(pretrained, "cpu"), held_out)
    output = train(config)
    assert torch.load(output, weights_only=True)["net"] == "Quad_L2Net_ConfCFS()"
    after = mma(load_model(output, "cpu"), held_out)
    logger.info("fine-tuning r2d2_WASF_N16: MMA@3 %.3f -> %.3f", before, after)
    assert after >= before - 0.02


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path, train_folder, monkeypatch):
    args = ["--images", str(train_folder), "--net", "Quad_L2Net_ConfCFS(mchan=1, dim=16)",
            "--crop", "48", "--scale", "64", "96", "--batch-size", "2", "--epoch-size", "6",
            "--epochs", "2", "--checkpoint-every", "2", "--workers", "0", "--lr", "1e-3",
            "--no-progress", "-q"]
    assert main(args + ["--output", str(tmp_path / "straight.pt")]) == 0

    # 3 steps per epoch, checkpoints after steps 2, 3 and 4: stop during step 5, i.e.
    # in the middle of the second epoch, as Ctrl-C would.
    real_step, calls = Trainer.step, []

    def interrupted_step(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", interrupted_step)
    interrupted = str(tmp_path / "interrupted.pt")
    assert main(args + ["--output", interrupted]) == 130
    assert not Path(interrupted).exists()
    monkeypatch.setattr(Trainer, "step", real_step)
    state = torch.load(resume_path(interrupted), weights_only=True)["training"]
    assert (state["epoch"], state["step"]) == (1, 1)
    assert main(args + ["--output", interrupted, "--resume", str(resume_path(interrupted))]) == 0

    straight = torch.load(tmp_path / "straight.pt", weights_only=True)["state_dict"]
    resumed = torch.load(interrupted, weights_only=True)["state_dict"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key

    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig(images=[str(train_folder)], net="Quad_L2Net_ConfCFS(mchan=1, dim=16)",
                          crop=48, scale=(64, 96), batch_size=2, epoch_size=6, epochs=2, lr=1e-4,
                          workers=0, output=interrupted, resume=str(resume_path(interrupted))))


def test_config_rejects_bad_settings(train_folder):
    with pytest.raises(ValueError, match="no training data"):
        TrainConfig()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(images=[str(train_folder)], batch_size=0)
    with pytest.raises(TypeError):
        TrainConfig(images=str(train_folder))
    with pytest.raises(ValueError, match="differs"):
        train(TrainConfig(images=[str(train_folder)], pretrained=str(weights_file("r2d2_WASF_N16")),
                          net="Quad_L2Net_ConfCFS(mchan=6)"))


def test_command_line_help_and_inference_never_imports_training():
    result = subprocess.run([sys.executable, "-m", "cv2r2d2.train", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--pretrained" in result.stdout and "--resume" in result.stdout
    code = ("import sys, cv2r2d2, cv2r2d2.feature2d, cv2r2d2.weights, cv2r2d2.torch_runner; "
            "sys.exit(any(m.startswith('cv2r2d2.train') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
