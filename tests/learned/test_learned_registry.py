"""Learned methods are registered once: in ``MASK_METHODS``, with their learn function and options."""

import dataclasses

import pytest
import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.learned import (
    GumbelOptions, ProxSparseOptions, learn_gumbel_masks, learn_masks, learn_proxsparse_masks, learned_methods,
    method_options,
)
from sparsecompile.masks import MASK_METHODS, get_method


def test_the_learned_methods_are_the_mask_methods_marked_learned():
    assert set(learned_methods()) == {"gumbel", "proxsparse"}
    assert {name for name, cls in MASK_METHODS.items() if not cls.learned} == {"magnitude", "activation", "hessian"}
    assert learned_methods()["gumbel"].learner() == (learn_gumbel_masks, GumbelOptions)
    assert learned_methods()["proxsparse"].learner() == (learn_proxsparse_masks, ProxSparseOptions)
    for name, cls in learned_methods().items():
        assert get_method(name).learned and dataclasses.is_dataclass(cls.learner()[1])


def test_options_and_dispatch_go_through_the_registry():
    assert method_options("gumbel", {"tau_end": 0.2}).tau_end == 0.2
    with pytest.raises(SparseCompileError, match="unknown gumbel option.*valid: .*init"):
        method_options("gumbel", {"lambda1": 1})
    for call in (lambda: method_options("magnitude"), lambda: learn_masks("magnitude", None, None)):
        with pytest.raises(SparseCompileError, match="unknown learned mask method 'magnitude'; valid: gumbel, proxsparse"):
            call()
    with pytest.raises(TypeError, match="ProxSparseOptions given for method 'gumbel'"):
        learn_masks("gumbel", torch.nn.Linear(4, 4), torch.zeros(1, 4), options=ProxSparseOptions())
