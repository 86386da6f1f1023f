import pytest

from sparsecompile.errors import SparseCompileError
from sparsecompile.targets import TARGETS, get_target


def test_required_targets_exist():
    assert {"cpu", "a100", "a10", "l4", "h100", "jetson-orin", "t4"} <= set(TARGETS)


@pytest.mark.parametrize("name", ["a100", "a10", "l4", "h100", "jetson-orin"])
def test_ampere_and_later_have_sparse_tensor_cores(name):
    target = get_target(name)
    assert target.sparse_tensor_cores and target.compute_capability >= (8, 0)


def test_t4_and_cpu_have_none():
    assert not get_target("t4").sparse_tensor_cores
    assert get_target("t4").compute_capability < (8, 0)
    assert not get_target("cpu").sparse_tensor_cores


def test_unknown_target_lists_valid_names():
    with pytest.raises(SparseCompileError) as info:
        get_target("v100")
    assert "a100" in str(info.value) and "jetson-orin" in str(info.value)
