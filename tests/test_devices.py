"""The device check: a device this machine lacks is a one-line ValueError, at once."""
from __future__ import annotations

import pytest
import torch

from cv2r2d2.utils import available_devices, torch_device


@pytest.fixture
def no_cuda(monkeypatch):
    """This process as on a CPU-only PyTorch build, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)


def test_devices_are_checked_and_named(no_cuda):
    assert torch_device(None) == torch.device("cpu")
    assert torch_device("cpu") == torch_device(torch.device("cpu")) == torch.device("cpu")
    assert available_devices()[0] == "cpu"
    with pytest.raises(ValueError) as caught:
        torch_device("cuda")
    message = str(caught.value)
    assert message.startswith("device 'cuda' is not available: this PyTorch")
    assert "without CUDA" in message and message.endswith("available: cpu")
    assert "\n" not in message
    with pytest.raises(ValueError, match="such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"):
        torch_device("gpu")
    with pytest.raises(TypeError, match="device must be a string"):
        torch_device(0.5)


def test_a_missing_cuda_index_names_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert torch_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"'cuda:2' is not available: this machine has 2 CUDA "
                                         r"device\(s\); available: cpu, cuda:0, cuda:1"):
        torch_device("cuda:2")
