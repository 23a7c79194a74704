"""A new scoring method is one class: this test-only scorer is registered here and runs through every generic
method test (imported from test_methods_generic) without any edit there."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvbench.methods import registry
from kvbench.methods.base import ScoredMethod
from test_methods_generic import (  # noqa: F401  (collected here with this module's `method_name`)
    test_budget_not_below_prompt_reproduces_generate, test_config_file_builds_the_method,
    test_kv_bytes_on_a_model_equal_the_registry_formula, test_registry_entry_is_complete,
    test_selection_keeps_distinct_positions_window_and_the_expected_size)


@dataclass
class KeyNormDummy(ScoredMethod):
    """Keeps the keys with the largest norm (a stand-in scorer, not a published method)."""
    name = "dummy_keynorm"
    display_name = "Dummy-KeyNorm"
    order = 1000
    window_size: int = 4

    def score(self, rank, queries, keys):
        prefix = keys[0, :, : keys.shape[2] - self.window_size].norm(dim=-1)  # [H_kv, P]
        return prefix.repeat_interleave(queries.shape[1] // keys.shape[1], dim=0)


@pytest.fixture(params=["dummy_keynorm", "dummy_keynorm_ada"])
def method_name(request):
    registry.register(KeyNormDummy, builtin=False)
    registry.register(KeyNormDummy, "dummy_keynorm_ada", display_name="Ada-Dummy", order=1001,
                      preset={"allocation": "adaptive"}, builtin=False)
    try:
        yield request.param
    finally:
        registry.unregister("dummy_keynorm")
        registry.unregister("dummy_keynorm_ada")


def test_dummy_is_gone_after_its_tests():
    assert not registry.is_registered("dummy_keynorm")
