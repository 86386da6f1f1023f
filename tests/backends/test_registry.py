"""The backend registry: one canonical name per backend, aliases for older spellings, one-line errors,
and every place that takes a backend by name resolving it there."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsecompile.backends import BACKENDS, backend_names, get_backend
from sparsecompile.backends.base import Runner
from sparsecompile.errors import SparseCompileError


def test_canonical_names_and_aliases():
    assert backend_names() == ("ort", "torch", "torch-cuda", "tensorrt")
    for name in backend_names():
        assert get_backend(name) is BACKENDS[name] and get_backend(name).name == name
    assert get_backend("onnxruntime-cpu") is get_backend("ort")  # the package runner's name before unification
    spellings = [s for entry in BACKENDS.values() for s in (entry.name, *entry.aliases)]
    assert len(spellings) == len(set(spellings))


@pytest.mark.parametrize("name", ["nope", "ORT", "", None])
def test_unknown_name_is_one_line_listing_the_valid_names(name):
    with pytest.raises(SparseCompileError) as error:
        get_backend(name)
    message = str(error.value)
    assert "\n" not in message and f"unknown backend '{name}'" in message
    assert "valid backends: ort, torch, torch-cuda, tensorrt" in message and "onnxruntime-cpu = ort" in message


def test_each_entry_names_its_runner_class():
    for name, entry in BACKENDS.items():
        runner = entry.runner_class()
        assert issubclass(runner, Runner) and runner.name == name


def test_importing_the_registry_imports_no_runtime():
    code = ("import sys, sparsecompile.backends as b; b.get_backend('tensorrt'); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_tensorrt_runner_class_is_found_without_importing_tensorrt():
    code = ("import sys, sparsecompile.backends as b; b.get_backend('tensorrt').runner_class(); "
            "print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------- the base contract


class _Plain(Runner):
    def __init__(self):
        self.seen = []

    def load(self):
        return self

    def infer(self, inputs):
        self.seen.append(inputs)
        return list(inputs)


def test_base_runner_defaults():
    runner = _Plain()
    arrays = [np.ones(3, np.float32)]
    assert runner.prepare(arrays) is arrays  # nothing to convert
    ms = runner.timed_infer(arrays)
    assert isinstance(ms, float) and ms >= 0 and runner.seen == [arrays]
    assert list(runner.layers) == []


def test_torch_runner_prepares_tensors_and_times_the_forward_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    program = torch.export.export(model.eval(), (torch.from_numpy(x),))
    from sparsecompile.backends.torch_runner import TorchRunner

    with TorchRunner(program.module()) as runner:  # load() on an exported graph: no NotImplementedError from eval()
        prepared = runner.prepare([x])
        assert isinstance(prepared, tuple) and isinstance(prepared[0], torch.Tensor)
        assert runner.timed_infer(prepared) >= 0
        with torch.no_grad():
            np.testing.assert_array_equal(runner.infer([x])[0], model(torch.from_numpy(x)).numpy())
        assert list(runner.layers) == []
    assert runner.module is None


# --------------------------------------------------------------------------- every caller resolves through it


@pytest.fixture
def extra_alias(monkeypatch):
    """A spelling only the registry knows: a caller accepts it only if it resolves names there."""
    from sparsecompile import backends

    monkeypatch.setitem(backends._BY_SPELLING, "cpu-fallback-for-test", BACKENDS["ort"])
    return "cpu-fallback-for-test"


def test_run_resolves_backends_through_the_registry(tmp_path, extra_alias):
    from sparsecompile.backends.onnxruntime_runner import OrtRunner
    from sparsecompile.runtime import build_runner

    manifest = {"target": "cpu", "inputs": []}
    runner = build_runner(tmp_path, manifest, extra_alias)
    assert isinstance(runner, OrtRunner) and runner.onnx_path == tmp_path / "model.onnx"
    assert isinstance(build_runner(tmp_path, manifest, "onnxruntime-cpu"), OrtRunner)
    with pytest.raises(SparseCompileError, match="valid backends: ort, torch, torch-cuda, tensorrt"):
        build_runner(tmp_path, manifest, "nope")
    with pytest.raises(SparseCompileError, match="backend 'tensorrt' does not run a build directory.*ort, torch-cuda"):
        build_runner(tmp_path, manifest, "tensorrt")


def test_profile_resolves_backends_through_the_registry(extra_alias, monkeypatch):
    from sparsecompile import profile
    from sparsecompile.profile import ProfileOptions, check_backend_available
    from sparsecompile.profile import run as profile_run  # where profile() looks these names up

    check_backend_available(extra_alias)
    with pytest.raises(SparseCompileError, match="valid backends: ort, torch, torch-cuda, tensorrt"):
        check_backend_available("nope")
    seen = {}

    def stop(options, *args):
        seen["backend"] = options.backend
        raise SparseCompileError("stop here")

    monkeypatch.setattr(profile_run, "_make_variants", stop)
    monkeypatch.setattr(profile_run, "default_threads", lambda: 1)
    with pytest.raises(SparseCompileError, match="stop here"):
        profile.profile(ProfileOptions(target=__file__, backend=extra_alias))
    assert seen["backend"] == "ort"  # the canonical name from there on (and in profile.json)


def test_package_backend_choice_gives_canonical_names():
    from sparsecompile.hardware import HostInfo
    from sparsecompile.package.edges import get_edge
    from sparsecompile.package.runner import choose_backend

    orin = get_edge("jetson-orin")
    for edge, host in ((orin, HostInfo("aarch64", "Orin", (8, 7), True)), (orin, HostInfo("x86_64")),
                       (get_edge("cpu-x86_64"), HostInfo("x86_64"))):
        name, _ = choose_backend(edge, host)
        assert name in BACKENDS and get_backend(name).name == name
