"""Magnitude's ``round_to``: every layer or family keeps a multiple of it (the largest one not
above the count ``sparsity`` asks for, at least one), so the shrunk model's channel counts suit
vector units."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hwprune as hp
from hwprune.errors import ConfigError
from hwprune.methods.selection import keep_all_but_lowest, kept_count
from test_map_structure import Residual

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), sparsity=st.floats(0.0, 0.99), round_to=st.integers(1, 32))
def test_kept_count_is_the_largest_multiple_not_above_the_asked_count(n, sparsity, round_to):
    plain = kept_count(n, sparsity, 1)
    keep = kept_count(n, sparsity, 1, round_to)
    assert 1 <= keep <= n
    if round_to == 1 or n <= round_to:
        assert keep == plain
    else:
        assert keep % round_to == 0
        assert keep <= plain < keep + round_to or keep == round_to > plain


def test_keep_vector_keeps_the_rounded_count_of_highest_scores():
    scores = torch.arange(40.0)
    keep = keep_all_but_lowest(scores, 0.3, 1, round_to=8)  # 28 asked: 24
    assert int(keep.sum()) == kept_count(40, 0.3, 1, 8) == 24
    assert bool(keep[-24:].all()) and not bool(keep[:16].any())


def test_filter_pruning_keeps_multiples_of_round_to_in_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 20, 3), nn.ReLU(),
                          nn.Conv2d(20, 6, 1))
    pruner = hp.Magnitude(model, "filter", 0.3, round_to=8, targets=["0", "2", "4"])
    kept = {n: int(l.parametrization.mask.reshape(l.shape[0], -1).any(1).sum())
            for n, l in pruner.layers.items()}
    # 40 -> 28 asked, 24 kept; 20 -> 14 asked, 8; 6 <= 8: unrounded, 4
    assert kept == {"0.weight": 24, "2.weight": 8, "4.weight": 4}


@pytest.mark.parametrize("method", ["Magnitude", "PSP"])
def test_map_pruning_rounds_every_family_and_shrink_gives_those_widths(method):
    torch.manual_seed(0)
    model = Residual().eval()  # families: the residual stream (8 maps) and the inner 6
    x = torch.randn(2, 3, 8, 8)
    extra = {"variant": "fixed"} if method == "PSP" else {}
    pruner = getattr(hp, method)(model, "map", sparsity=0.5, example_inputs=x, round_to=4,
                                 **extra)
    pruner.step()  # PSP's fixed variant ranks after each step
    pruner.finalize()
    r = hp.shrink(model, x, return_result=True)
    assert r.layers["conv0"] == ((3, 8), (3, 4)) and r.layers["conv1"] == ((8, 6), (4, 4))


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"structure": "element", "sparsity": 0.5, "round_to": 8}, "whole filters"),
    ({"structure": "filter", "sparsity": 0.5, "round_to": 8, "scope": "global"}, "scope"),
    ({"structure": "filter", "sparsity": 0.5, "round_to": 0}, "positive int"),
    ({"structure": "filter", "sparsity": 0.5, "round_to": 2.0}, "positive int"),
])
def test_round_to_refuses_what_it_cannot_round(kwargs, words):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match=words):
        hp.Magnitude(model, **kwargs)


def test_psp_rounds_only_its_fixed_variant():
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 4))
    with pytest.raises(ConfigError, match="variant='fixed'"):
        hp.PSP(model, "filter", round_to=8, targets="0")
    pruner = hp.PSP(model, "filter", variant="fixed", sparsity=0.3, round_to=8, targets="0")
    pruner.step()  # the fixed variant ranks after each step
    kept = pruner.layers["0.weight"].parametrization  # 40 -> 28 asked, 24 kept
    assert int(kept.keep.sum()) == 24
