"""The hardware registry: each target listed once with all its facts, and the views other modules read agree with it."""

from __future__ import annotations

import click
import pytest

import sparsecompile.package
from sparsecompile.cli import main
from sparsecompile.engine.speed_model import DEVICES
from sparsecompile.package.edges import EDGE_TARGETS, get_edge
from sparsecompile.targets import HARDWARE, TARGETS, DeviceSpec, Target, _by_name, get_target


def test_each_target_is_listed_once():
    assert all(name == entry.name for name, entry in HARDWARE.items())
    descriptions = [entry.description for entry in HARDWARE.values()]
    assert len(descriptions) == len(set(descriptions)), "one piece of hardware under two names"
    twice = [HARDWARE["a100"], Target("a100", "another A100", "gpu", (8, 0), True, "fp16")]
    with pytest.raises(ValueError, match="'a100' is listed twice"):
        _by_name(twice)


def test_every_entry_plays_a_role():
    assert all(entry.buildable or entry.edge for entry in HARDWARE.values())


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_facts_are_consistent(name):
    entry = HARDWARE[name]
    assert entry.kind in ("gpu", "cpu")
    assert (entry.compute_capability is not None) == (entry.kind == "gpu")
    assert (entry.arch is not None) == (entry.kind == "cpu" and entry.edge)
    if entry.kind == "gpu":
        assert entry.edge, "every GPU a bundle can be built for can be shipped to"
        assert entry.sparse_tensor_cores == (entry.compute_capability >= (8, 0))
    else:
        assert not entry.sparse_tensor_cores and entry.device is None
    if entry.device is not None:
        assert isinstance(entry.device, DeviceSpec) and entry.sparse_tensor_cores
        assert entry.device.dense_fp16_tflops > 0 and entry.device.bandwidth_gbs > 0 and entry.device.source


def test_build_targets_are_the_buildable_entries():
    assert list(TARGETS) == [name for name, entry in HARDWARE.items() if entry.buildable]
    for name, target in TARGETS.items():
        assert target is HARDWARE[name] and get_target(name) is target


def test_speed_model_devices_are_the_entries_with_device_numbers():
    assert list(DEVICES) == [name for name, entry in HARDWARE.items() if entry.device is not None]
    for name, spec in DEVICES.items():
        assert spec is HARDWARE[name].device


def test_edge_targets_are_the_edge_entries():
    assert sparsecompile.package.EDGE_TARGETS is EDGE_TARGETS
    assert list(EDGE_TARGETS) == [name for name, entry in HARDWARE.items() if entry.edge]
    for name, edge in EDGE_TARGETS.items():
        entry = HARDWARE[name]
        assert get_edge(name) is edge
        assert (edge.name, edge.description, edge.kind, edge.arch, edge.compute_capability) == \
            (entry.name, entry.description, entry.kind, entry.arch, entry.compute_capability)


def test_report_record_keeps_its_fields():
    assert list(HARDWARE["a100"].to_json()) == ["name", "description", "kind", "compute_capability",
                                                "sparse_tensor_cores", "default_precision", "reduction_alignment"]
    assert HARDWARE["jetson-orin"].to_json()["compute_capability"] == "8.7"
    assert HARDWARE["cpu"].to_json()["compute_capability"] is None


def _option(command: str, name: str) -> click.Option:
    return next(p for p in main.commands[command].params if p.name == name)


def test_cli_choices_come_from_the_registry():
    assert list(_option("package", "edge").type.choices) == sorted(EDGE_TARGETS)
    assert _option("build", "target").help == f"Deployment target: {', '.join(sorted(TARGETS))}."
