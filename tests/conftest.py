"""Shared fixtures: small models saved in every input format the frontend accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(2)


class SmallNet(nn.Module):
    """Conv + BN + residual + linear: every pattern the foundation handles, tiny."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        y = y.mean((2, 3))
        return self.fc2(self.drop(torch.relu(self.fc1(y))))


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.fc = nn.Linear(12, 8)

    def forward(self, signal, features):
        return self.conv(signal).mean(-1), torch.relu(self.fc(features))


def make_small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallNet()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def build_factory():
    """``--model-factory tests.conftest:build_factory``."""
    return SmallNet().eval()


def small_input(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a whole test module (``pytestmark = pytest.mark.usefixtures(...)``).

    Small SVDs and tiny tensors are fastest, and steadiest on a shared 2-core machine, on one thread:
    two threads cost 10-100x in hand-offs there.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_net():
    return make_small_net()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory, small_net):
    """The same SmallNet saved as .pt2 (dynamic and static batch), TorchScript, pickle and state dicts."""
    root = tmp_path_factory.mktemp("models")
    x = small_input()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(small_net, (x,), dynamic_shapes=({0: batch},)), root / "dynamic.pt2")
    torch.export.save(torch.export.export(small_net, (x,)), root / "static.pt2")
    torch.jit.save(torch.jit.trace(small_net, (x,)), root / "scripted.ts")
    torch.save(small_net, root / "pickled.pt")
    torch.save(small_net.state_dict(), root / "state_dict.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in small_net.state_dict().items()}, str(root / "weights.safetensors"))
    calib = torch.randn(48, 4, 8, 8, generator=torch.Generator().manual_seed(2)).numpy()
    np.save(root / "calib.npy", calib)
    return root


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory, model_files):
    """One complete build of SmallNet, shared by tests that only read it."""
    from sparsecompile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("builds") / "small"
    # magnitude masks: the readers check what the permutation search promised against the masks kept
    # (and --method auto is tested in test_guard.py)
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out),
                                calib=str(model_files / "calib.npy"), min_weights=0, method="magnitude"))
    return result


@pytest.fixture(scope="session")
def scaled_mlp(tmp_path_factory):
    """An MLP that one-shot magnitude 2:4 breaks and activation-aware masks keep intact.

    Every other input feature is 1000x larger and its weights 2x smaller, so the small weights carry
    almost all of the output: magnitude masks drop exactly those (about 45 points of top-1 agreement
    lost), while masks that weigh |w| by the input's scale keep them (no agreement lost). Only the first
    Linear (64x64) is eligible with ``min_weights=1000``. Returns (model path, calibration path).
    """
    root = tmp_path_factory.mktemp("scaled_mlp")
    generator = torch.Generator().manual_seed(0)
    even = torch.arange(64) % 2 == 0
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 64, generator=generator) / 8 * torch.where(even, 0.5, 1.0))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.randn(10, 64, generator=generator) / 8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (torch.randn(4, 64),), dynamic_shapes=({0: batch},)),
                      root / "mlp.pt2")
    calib = torch.randn(256, 64, generator=generator) * torch.where(even, 1000.0, 1.0)
    np.save(root / "calib.npy", calib.numpy())
    return root / "mlp.pt2", root / "calib.npy"
