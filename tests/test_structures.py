"""Structures: exact round trips, group counts by hand, k-of-n invariants, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hwprune.errors import StructureError
from hwprune.structures import (
    Block,
    Channel,
    Column,
    Element,
    Filter,
    Kernel,
    KofN,
    Layer,
    parse_structure,
)

dims = st.integers(min_value=1, max_value=7)
conv_shapes = st.tuples(dims, dims, dims, dims)  # (K, C, R, S)
conv1d_shapes = st.tuples(dims, dims, dims)  # (K, C, L)
linear_shapes = st.tuples(dims, dims)  # (K, C): Linear, or an LSTM/GRU weight matrix
any_shape = st.one_of(conv_shapes, conv1d_shapes, linear_shapes)


def expected_groups(name: str, shape: tuple[int, ...], bh: int = 1, bw: int = 1) -> int:
    """Group counts of a (K, C, R, S) weight, counted by hand (Linear: R = S = 1)."""
    K, C = shape[0], shape[1]
    RS = math.prod(shape[2:])
    return {
        "element": K * C * RS,
        "filter": K,
        "channel": C,
        "kernel": K * C,
        "column": C * RS,
        "layer": 1,
        "block": math.ceil(K / bh) * math.ceil(C * RS / bw),
    }[name]


def random_weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@settings(max_examples=60, deadline=None)
@given(shape=any_shape, name=st.sampled_from(["element", "filter", "channel", "layer"]))
def test_round_trip_and_counts_simple(shape, name):
    s = parse_structure(name)
    w = random_weight(shape)
    g = s.to_groups(w)
    assert g.shape[0] == expected_groups(name, shape) == s.num_groups(shape)
    assert g.shape[0] * g.shape[1] == w.numel()
    assert torch.equal(s.from_groups(g, shape), w)


@settings(max_examples=60, deadline=None)
@given(shape=st.one_of(conv_shapes, conv1d_shapes), name=st.sampled_from(["kernel", "column"]))
def test_round_trip_and_counts_conv_only(shape, name):
    s = parse_structure(name)
    w = random_weight(shape)
    g = s.to_groups(w)
    assert g.shape[0] == expected_groups(name, shape)
    assert torch.equal(s.from_groups(g, shape), w)


@settings(max_examples=60, deadline=None)
@given(shape=any_shape, bh=st.integers(1, 5), bw=st.integers(1, 5), data=st.data())
def test_block_round_trip_counts_and_padding(shape, bh, bw, data):
    rows, cols = shape[0], math.prod(shape[1:])
    bh, bw = min(bh, rows), min(bw, cols)
    s = Block(bh, bw)
    s.validate(shape)
    w = random_weight(shape)
    g = s.to_groups(w)
    assert g.shape == (expected_groups("block", shape, bh, bw), bh * bw)
    assert torch.equal(s.from_groups(g, shape), w)
    # padding is zeros, so norms are unaffected, and sizes count only real weights
    assert torch.isclose(g.abs().sum(), w.abs().sum(), rtol=1e-5)
    assert s.group_sizes(shape).sum().item() == w.numel()


def test_block_tiles_are_tiles_of_the_im2col_matrix():
    w = torch.arange(4 * 2 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2, 2)
    g = Block(2, 4).to_groups(w)
    m = w.reshape(4, 8)
    assert torch.equal(g[0], m[0:2, 0:4].reshape(-1))
    assert torch.equal(g[1], m[0:2, 4:8].reshape(-1))
    assert torch.equal(g[2], m[2:4, 0:4].reshape(-1))


@settings(max_examples=60, deadline=None)
@given(shape=any_shape, name=st.sampled_from(["element", "filter", "channel", "layer"]),
       seed=st.integers(0, 10_000))
def test_expand_puts_each_group_value_on_exactly_its_weights(shape, name, seed):
    s = parse_structure(name)
    values = torch.randperm(s.num_groups(shape), generator=torch.Generator().manual_seed(seed))
    full = s.expand(values.float(), shape)
    g = s.to_groups(full)
    assert torch.equal(g, values.float()[:, None].expand_as(g))


def test_groups_mean_what_the_table_says():
    w = random_weight((5, 6, 3, 3))
    assert torch.equal(Filter().to_groups(w)[2], w[2].reshape(-1))
    assert torch.equal(Channel().to_groups(w)[4], w[:, 4].reshape(-1))
    assert torch.equal(Kernel().to_groups(w)[1 * 6 + 3], w[1, 3].reshape(-1))
    # column order is (r, s, c), input channel fastest
    assert torch.equal(Column().to_groups(w)[(1 * 3 + 2) * 6 + 4], w[:, 4, 1, 2])
    assert torch.equal(Layer().to_groups(w)[0], w.reshape(-1))


def test_element_runs_follow_input_channels_like_sparse_tensor_cores():
    w = random_weight((2, 8, 3, 3))
    g = Element().to_groups(w).reshape(-1, 4)  # runs of 4
    assert torch.equal(g[0], w[0, 0:4, 0, 0])
    assert torch.equal(g[1], w[0, 4:8, 0, 0])
    assert torch.equal(g[2], w[0, 0:4, 0, 1])


kn = st.integers(1, 8).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n)))


@settings(max_examples=80, deadline=None)
@given(kn=kn, k_out=dims, c_mult=st.integers(1, 4), kernel=st.sampled_from([(), (3,), (2, 3)]),
       seed=st.integers(0, 10_000))
def test_k_of_n_keeps_exactly_k_in_every_run(kn, k_out, c_mult, kernel, seed):
    k, n = kn
    shape = (k_out, n * c_mult, *kernel)
    s = KofN(k, n)
    s.validate(shape)
    w = random_weight(shape, seed)
    keep = s.keep_top(s.scores(w))
    mask = s.expand(keep.float(), shape).bool()
    runs = mask.movedim(1, -1).reshape(-1, n)  # runs of n along the input channels
    assert (runs.sum(dim=1) == k).all()
    # the kept ones are the largest magnitudes of their run
    mags = w.abs().movedim(1, -1).reshape(-1, n)
    kept_min = torch.where(runs, mags, torch.inf).min(dim=1).values
    dropped_max = torch.where(~runs, mags, -torch.inf).max(dim=1).values
    assert (kept_min >= dropped_max).all()


def test_k_of_n_over_kernels():
    s = parse_structure("2:4@kernel")
    w = random_weight((3, 8, 3, 3))
    mask = s.expand(s.keep_top(s.scores(w)).float(), w.shape).bool()
    per_kernel = mask.all(dim=(2, 3))
    assert torch.equal(per_kernel, mask.any(dim=(2, 3)))  # whole kernels
    assert (per_kernel.reshape(3, 2, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("spec", ["element", "filter", "channel", "kernel", "column", "layer",
                                  "2:4", "1:8", "2:4@kernel", "block:4x4", "block:1x8",
                                  "element@0"])
def test_spec_strings_parse_back(spec):
    s = parse_structure(spec)
    assert parse_structure(str(s)) == s


@pytest.mark.parametrize("bad", ["elements", "5:4", "0:4", "2:4@bogus", "block:0x4",
                                 "block:4", "", "2:4:8"])
def test_bad_names_say_what_is_allowed(bad):
    with pytest.raises(StructureError, match="allowed|1 <= k <= n|positive"):
        parse_structure(bad)


def test_structure_a_layer_cannot_have_names_the_layer():
    with pytest.raises(StructureError, match="fc1.weight.*conv weight"):
        Column().validate((10, 20), "fc1.weight")
    with pytest.raises(StructureError, match="conv2.weight.*does not divide.*allowed n"):
        KofN(2, 4).validate((8, 6, 3, 3), "conv2.weight")
    with pytest.raises(StructureError, match="larger than"):
        Block(8, 8).validate((4, 16), "fc")
    with pytest.raises(StructureError, match="axis"):
        Element(axis=3).validate((4, 4), "fc")
