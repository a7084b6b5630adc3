"""ADMM weight unification and pruning: the exact projection (against brute force), the ADMM
loop, the fixed-pattern retraining phase with tied magnitudes, finalize, report and storage."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

import hwprune as hp
from hwprune.errors import ConfigError, LifecycleError, StructureError
from hwprune.hardware import FREE, UNIFIED, ZERO
from hwprune.methods.admm import DEFAULT_RHO_GROWTH, _SquaredDistance, _Unchanged
from hwprune.methods.unify import (
    assign_blocks,
    block_counts,
    block_errors,
    project,
    project_groups,
)
from hwprune.storage import stored_bytes
from hwprune.structures import Block, Filter, parse_structure

from conftest import TinyNet, fit_full_batch

# -- the projection ------------------------------------------------------------------------


def _brute_force(groups, valid):
    """{(n_unify, n_zero): minimum of ||P - V||^2} over every assignment of the blocks; the
    unified value of a block is searched on a fine grid of s >= 0 (not the closed form)."""
    grid = torch.linspace(0, float(groups.abs().max()) * 1.01, 2001, dtype=torch.float64)
    a = groups.double().abs()
    costs = {UNIFIED: (((a[:, :, None] - grid) ** 2) * valid[:, :, None]).sum(1).min(1).values,
             ZERO: (groups.double() ** 2).sum(1), FREE: torch.zeros(groups.shape[0])}
    costs = {k: v.tolist() for k, v in costs.items()}
    best: dict[tuple[int, int], float] = {}
    for states in itertools.product((ZERO, UNIFIED, FREE), repeat=groups.shape[0]):
        key = (states.count(UNIFIED), states.count(ZERO))
        cost = sum(costs[s][i] for i, s in enumerate(states))
        best[key] = min(best.get(key, math.inf), cost)
    return best, float(grid[1] - grid[0])


@pytest.mark.parametrize("seed", range(5))
def test_projection_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    blocks, size = 6, 3
    groups = torch.randn(blocks, size, generator=g, dtype=torch.float64)
    groups[0] *= 0.1  # some blocks near zero, some near unified: the classes compete
    groups[1] = groups[1].sign() * (1 + 0.05 * torch.rand(size, generator=g))
    valid = torch.ones(blocks, size, dtype=torch.bool)
    valid[-1, -1] = False  # a ragged edge block
    groups[~valid] = 0.0
    brute, step = _brute_force(groups, valid)
    for (n_unify, n_zero), best in brute.items():
        out, states, _ = project_groups(groups, valid, n_unify, n_zero)
        ours = float(((out - groups) ** 2).sum())
        # the grid only approximates the best s: it can be above the exact optimum by at
        # most size * (step / 2)^2 per unified block, never below it
        assert ours <= best + 1e-12
        assert best - ours <= n_unify * size * (step / 2) ** 2 + 1e-12
        assert int((states == UNIFIED).sum()) == n_unify
        assert int((states == ZERO).sum()) == n_zero


def test_assignment_is_exact_on_many_random_cases():
    """The split-point algorithm against enumeration of all assignments (errors given)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        n = int(torch.randint(2, 8, (1,), generator=g))
        eu = torch.rand(n, generator=g, dtype=torch.float64)
        ez = eu + torch.rand(n, generator=g, dtype=torch.float64) * 2  # ez >= eu, as always
        n_unify = int(torch.randint(0, n + 1, (1,), generator=g))
        n_zero = int(torch.randint(0, n - n_unify + 1, (1,), generator=g))
        states = assign_blocks(eu, ez, n_unify, n_zero)
        ours = float(eu[states == UNIFIED].sum() + ez[states == ZERO].sum())
        best = min(
            sum(float(eu[i]) for i in u) + sum(float(ez[i]) for i in z)
            for u in itertools.combinations(range(n), n_unify)
            for z in itertools.combinations(sorted(set(range(n)) - set(u)), n_zero)
        )
        assert ours == pytest.approx(best, abs=1e-12)


def test_unified_value_is_the_mean_magnitude_with_signs_kept():
    v = torch.tensor([[1.0, -3.0, 0.0, 2.0]])
    out, states, mags = project_groups(v, torch.ones_like(v, dtype=torch.bool), 1, 0)
    assert states.tolist() == [UNIFIED]
    assert mags.tolist() == [1.5]
    assert out.tolist() == [[1.5, -1.5, 1.5, 1.5]]  # a zero member takes the + sign
    s, eu, ez = block_errors(v, torch.ones_like(v, dtype=torch.bool))
    assert eu.item() == pytest.approx(0.25 + 2.25 + 2.25 + 0.25) and ez.item() == 14.0


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 9), c=st.integers(1, 6), r=st.sampled_from([1, 3]),
       bh=st.integers(1, 4), bw=st.integers(1, 6), unify=st.floats(0, 1), zero=st.floats(0, 1))
def test_projection_shapes_counts_and_constraint(k, c, r, bh, bw, unify, zero):
    shape = (k, c, r, r)
    if bh > k or bw > c * r * r:
        return
    zero = min(zero, 1 - unify)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(k * 100 + c))
    s = Block(bh, bw)
    p = project(w, s, unify, zero)
    assert p.shape == w.shape
    groups, valid = s.to_groups(p), s.to_groups(torch.ones(shape)) > 0
    n_unify, n_zero = block_counts(groups.shape[0], unify, zero)
    zero_blocks = (groups == 0).all(1)
    assert int(zero_blocks.sum()) == n_zero  # randn has no zero block by accident
    same = groups.abs().where(valid, groups.abs().amax(1, keepdim=True))
    unified = (same == same[:, :1]).all(1) & ~zero_blocks
    free = ~zero_blocks & ~unified
    assert torch.equal(s.to_groups(w)[free], groups[free])  # free blocks are untouched
    # a unified block keeps its signs (zero members are +)
    signs = torch.where(s.to_groups(w) < 0, -1.0, 1.0)
    assert torch.equal(groups[unified].sign() * valid[unified], signs[unified] * valid[unified])
    assert int(unified.sum()) >= n_unify  # a 1-weight free block is also "unified"


def test_block_counts_round_and_never_exceed_the_blocks():
    assert block_counts(10, 0.5, 0.25) == (5, 3)
    assert block_counts(5, 0.5, 0.5) == (2, 3)  # rounding: the unified count gives way
    assert block_counts(7, 0.0, 1.0) == (0, 7)


# -- the pruner ------------------------------------------------------------------------------


def _unified_blocks(structure, w):
    """Per block: all zero, all one magnitude (bit for bit), or neither."""
    groups = structure.to_groups(w)
    valid = structure.to_groups(torch.ones(w.shape)) > 0
    zero = (groups == 0).all(1)
    mags = groups.abs().where(valid, groups.abs().amax(1, keepdim=True))
    unified = (mags == mags[:, :1]).all(1) & ~zero
    return zero, unified


def test_finalize_leaves_exact_unified_and_zero_blocks_with_the_requested_fractions(tiny, x8):
    pruner = hp.ADMM(tiny, block=(1, 4), unify=0.5, zero=0.25, rho=0.05, admm_interval=3)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    y = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    fit_full_batch(tiny, pruner, opt, x8, y, 9)
    pruner.hard_project()
    signs = {n: torch.where(l.original() < 0, -1.0, 1.0) for n, l in pruner.layers.items()}
    fit_full_batch(tiny, pruner, opt, x8, y, 5)  # retraining moves the magnitudes
    model = pruner.finalize()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for name, layer in pruner.layers.items():
        w = model.get_parameter(name).detach()
        zero, unified = _unified_blocks(layer.structure, w)
        blocks = zero.numel()
        n_unify, n_zero = block_counts(blocks, 0.5, 0.25)
        assert int(zero.sum()) == n_zero
        assert int(unified.sum()) == n_unify  # the free blocks of randn weights are not
        groups, sign_groups = layer.structure.to_groups(w), layer.structure.to_groups(signs[name])
        assert torch.equal(groups[unified].sign(), sign_groups[unified])  # signs as fixed
        assert not torch.signbit(w[w == 0]).any()  # +0.0, so storage sees the pattern
        extras = pruner.layer_extras()[name]
        assert extras["unified"] == n_unify / blocks and extras["zero"] == n_zero / blocks
        assert extras["free"] == pytest.approx(1 - (n_unify + n_zero) / blocks)
        # 1x4 blocks: a unified block saves 3 of 4 multiplications, a zero block all 4
        assert extras["mults_saved"] == pytest.approx((3 * n_unify + 4 * n_zero) / w.numel())


def test_unified_block_receives_one_gradient_the_sum_over_members_times_sign(tiny):
    pruner = hp.ADMM(tiny, block=(2, 2), unify=0.6, zero=0.2, targets=["conv2"])
    pruner.hard_project()
    layer = pruner.layers["conv2.weight"]
    p = layer.parametrization
    c = torch.randn(layer.shape, generator=torch.Generator().manual_seed(3))
    (c * layer.effective_weight()).sum().backward()
    signs = layer.structure.to_groups(p.signs)
    expected = (layer.structure.to_groups(c) * signs).sum(1)
    unified = p.states == UNIFIED
    assert torch.allclose(p.magnitude.grad[unified], expected[unified])
    assert (p.magnitude.grad[~unified] == 0).all()
    grad_w = layer.structure.to_groups(layer.original().grad)
    assert (grad_w[p.states != FREE] == 0).all()  # tied and zero weights are not trained
    assert torch.equal(grad_w[p.states == FREE], layer.structure.to_groups(c)[p.states == FREE])
    # and the optimizer updates it as one weight: all members move by the same amount
    opt = torch.optim.SGD(pruner.param_groups(lr=0.1))
    before = layer.effective_weight().detach().abs()
    opt.step()
    moved = layer.structure.to_groups(layer.effective_weight().detach().abs() - before)[unified]
    assert torch.allclose(moved, moved[:, :1].expand_as(moved))
    assert moved.abs().sum() > 0


def test_admm_residual_shrinks_over_rounds_on_digits():
    from hwprune.data import load_digits
    from hwprune.models import SmallCNN
    from hwprune.training import make_loader, train_epoch

    train, _ = load_digits()
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    loader = make_loader(torch.utils.data.Subset(train, range(256)), 64, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        train_epoch(model, loader, opt)
    pruner = hp.ADMM(model, block=(1, 4), unify=0.5, zero=0.25, rho=0.1, rho_growth=1.5,
                     admm_interval=4)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.02, momentum=0.9))
    for _ in range(10):  # 4 steps per epoch: one ADMM round each
        train_epoch(model, loader, opt, pruner)
    residuals = [h["relative_residual"] for h in pruner.history]
    assert len(residuals) == 10
    assert residuals[-1] < 0.5 * max(residuals)
    assert residuals[-6:] == sorted(residuals[-6:], reverse=True)  # falls round after round
    assert [h["rho"] for h in pruner.history][:2] == pytest.approx([0.1, 0.15])
    assert pruner.residual() > 0


def test_penalty_is_half_rho_times_the_squared_distance(tiny):
    pruner = hp.ADMM(tiny, unify=0.5, rho=0.3)
    expected = sum(((l.original() - l.parametrization.z) ** 2).sum()
                   for l in pruner.layers.values())
    assert expected > 0
    assert pruner.penalty().item() == pytest.approx(0.15 * expected.item())
    pruner.hard_project()
    assert pruner.penalty().item() == 0.0


def test_rho_grows_per_round_up_to_its_cap_and_the_dual_is_rescaled(tiny, x8):
    pruner = hp.ADMM(tiny, zero=0.5, unify=0.0, rho=0.1, rho_growth=2.0, rho_max=0.3,
                     admm_interval=2)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.01))
    y = torch.randn(4, 10)
    fit_full_batch(tiny, pruner, opt, x8, y, 3)
    assert pruner.rho == 0.2 and pruner.rounds == 1
    u = {n: l.parametrization.u.clone() for n, l in pruner.layers.items()}
    w = {n: l.original().detach().clone() for n, l in pruner.layers.items()}
    fit_full_batch(tiny, pruner, opt, x8, y, 1)  # step 4: the second round
    assert pruner.rho == 0.3  # capped
    for n, l in pruner.layers.items():
        p = l.parametrization
        w4 = l.original().detach()
        # U_new = (U + W - Z) * rho_old / rho_new
        assert torch.allclose(p.u, (u[n] + w4 - p.z) * (0.2 / 0.3), atol=1e-7)
        assert not torch.equal(w4, w[n])
    fit_full_batch(tiny, pruner, opt, x8, y, 4)
    assert pruner.rho == 0.3 and [h["rho"] for h in pruner.history] == [0.1, 0.2, 0.3, 0.3]


def test_given_the_phase_length_rho_reaches_its_cap_at_the_last_round(tiny, x8):
    """With ``admm_steps`` (what the runner passes) and no ``rho_growth``, rho grows by
    (rho_max / rho) ** (1 / rounds): still below its cap one round before the end, at it
    (to rounding) after the last; an explicit ``rho_growth`` wins; without either, the
    default growth."""
    pruner = hp.ADMM(tiny, zero=0.5, unify=0.0, rho=1e-3, rho_max=1.0, admm_interval=2,
                     admm_steps=10)  # 5 rounds
    assert pruner.rho_growth == pytest.approx(1000 ** (1 / 5))
    opt = torch.optim.SGD(pruner.param_groups(lr=0.01))
    y = torch.randn(4, 10)
    fit_full_batch(tiny, pruner, opt, x8, y, 8)
    assert pruner.rounds == 4 and pruner.rho == pytest.approx(1000 ** (4 / 5) * 1e-3)
    fit_full_batch(tiny, pruner, opt, x8, y, 2)
    assert pruner.rounds == 5 and pruner.rho == pytest.approx(1.0)
    assert hp.ADMM(TinyNet(), zero=0.5, unify=0.0, rho_growth=1.1,
                   admm_steps=10).rho_growth == 1.1
    assert hp.ADMM(TinyNet(), zero=0.5, unify=0.0).rho_growth == DEFAULT_RHO_GROWTH
    assert hp.ADMM(TinyNet(), zero=0.5, unify=0.0, admm_interval=20,
                   admm_steps=10).rho_growth == 1.0  # no round at all
    with pytest.raises(ConfigError, match="admm_steps must be None or an int >= 1"):
        hp.ADMM(TinyNet(), zero=0.5, unify=0.0, admm_steps=0)


def test_the_runner_passes_the_pruning_phase_in_steps_unless_the_recipe_says_otherwise():
    from hwprune.app.build import run_method_kwargs
    from hwprune.app.recipe import resolve

    def kwargs(method):
        return run_method_kwargs(resolve({"model": {"name": "x"}, "method": method,
                                          "train": {"prune_epochs": 3}}), 40)

    assert kwargs({"name": "ADMM", "zero": 0.5})["admm_steps"] == 120
    assert kwargs({"name": "ADMM", "zero": 0.5, "admm_steps": 7})["admm_steps"] == 7
    assert "admm_steps" not in kwargs({"name": "Magnitude", "structure": "2:4",
                                       "sparsity": 0.5})


def test_plain_admm_pruning_at_filter_structure(tiny, x8):
    pruner = hp.ADMM(tiny, block="filter", unify=0.0, zero=0.5, rho=0.05, admm_interval=2,
                     retrain_at=6)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05))
    fit_full_batch(tiny, pruner, opt, x8, torch.randn(4, 10), 8)
    assert pruner.phase == "retrain"
    model = pruner.finalize()
    for name in pruner.layers:
        w = model.get_parameter(name)
        assert int((Filter().to_groups(w) == 0).all(1).sum()) == w.shape[0] // 2
    assert pruner.sparsity() == pytest.approx(0.5)


def test_ragged_blocks_share_one_magnitude_over_their_real_weights(tiny):
    # conv2's im2col matrix is 16 x 72: 3x5 tiles leave a ragged edge both ways
    pruner = hp.ADMM(tiny, block=(3, 5), unify=1.0, zero=0.0, targets=["conv2"])
    w = pruner.finalize().conv2.weight.detach()
    zero, unified = _unified_blocks(Block(3, 5), w)
    assert unified.all() and not zero.any()


def test_finalized_unified_weights_are_stored_as_one_magnitude_plus_signs(tiny, tmp_path):
    pruner = hp.ADMM(tiny, block=(1, 4), unify=0.5, zero=0.25)
    model = pruner.finalize()
    w = model.conv3.weight.detach()
    # no hint needed: 1 x 4 is among the tiles always tried; the byte formulas are those of the
    # values uncoded (hp.save codes their byte planes by default)
    info = stored_bytes(w, code_values=False)
    blocks = w.numel() // 4
    n_unify, n_zero = block_counts(blocks, 0.5, 0.25)
    n_free = blocks - n_unify - n_zero
    assert info["encoding"] == "unified" and info["params"] == {"bh": 1, "bw": 4}
    # one float32 magnitude per unified block + the free blocks' values; 2 state bits per
    # block + one sign bit per weight of a unified block
    assert info["payload_bytes"] == 4 * (n_unify + 4 * n_free)
    assert info["index_bytes"] == math.ceil(2 * blocks / 8) + math.ceil(4 * n_unify / 8)
    rep = hp.report(model, torch.randn(2, 3, 8, 8), pruner=pruner)
    row = {r.name: r for r in rep.rows}["conv3.weight"]
    assert row.encoding == "unified" and row.stored_bytes == stored_bytes(w)["total_bytes"]
    assert row.extras["unified"] == n_unify / blocks
    path = tmp_path / "m.hwp"
    hp.save(model, path)
    loaded = hp.load(path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_hard_project_twice_and_verbs_after_finalize_are_errors(tiny):
    pruner = hp.ADMM(tiny, unify=0.5)
    pruner.hard_project()
    with pytest.raises(LifecycleError, match="already called"):
        pruner.hard_project()
    pruner.finalize()
    with pytest.raises(LifecycleError, match="after finalize"):
        pruner.hard_project()


def test_masks_show_zero_blocks_only_once_the_pattern_is_fixed(tiny):
    pruner = hp.ADMM(tiny, block=(1, 4), unify=0.25, zero=0.5)
    assert all(m.all() for m in pruner.masks().values())  # ADMM phase: W is dense
    pruner.hard_project()
    assert pruner.sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(unify=1.2), ConfigError, r"unify must be a fraction of blocks in \[0, 1\]; got 1.2"),
    (dict(zero=-0.1), ConfigError, r"zero must be a fraction"),
    (dict(unify=0.7, zero=0.4), ConfigError, "unify \\+ zero must be at most 1"),
    (dict(unify=0.0, zero=0.0), ConfigError, "constrain nothing"),
    (dict(rho=0.0), ConfigError, "rho must be a finite number > 0; got 0.0"),
    (dict(rho=-1.0), ConfigError, "rho must be"),
    (dict(rho=0.5, rho_max=0.1), ConfigError, "rho_max"),
    (dict(rho_growth=0.9), ConfigError, "rho_growth must be a finite number >= 1"),
    (dict(admm_interval=0), ConfigError, "admm_interval"),
    (dict(retrain_at=0), ConfigError, "retrain_at"),
    (dict(block=(1, 4, 2)), StructureError, r"\(bh, bw\)"),
    (dict(block=(0, 4)), StructureError, r"\(bh, bw\)"),
    (dict(block="2:4"), StructureError, "k-of-n"),
    # layers that cannot carry the block: refused with strict=True (default targets skip them,
    # tests/test_targets_fit.py)
    (dict(block=(32, 4), strict=True), StructureError, "conv2.weight: block 32x4 is larger"),
    (dict(block="column", strict=True), StructureError, "fc1.weight"),
])
def test_bad_input_is_refused_before_the_model_is_touched(tiny, kwargs, error, match):
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(error, match=match):
        hp.ADMM(tiny, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in tiny.modules())
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


def test_structure_names_and_blocks_parse_as_documented(tiny):
    assert hp.ADMM(tiny, block=(2, 2), targets=["conv2"]).structure == Block(2, 2)
    assert hp.ADMM(TinyNet(), block="block:4x4").structure == parse_structure("block:4x4")
    assert str(hp.ADMM(TinyNet(), block="kernel", targets=["conv*"]).structure) == "kernel"


def test_retraining_keeps_training_the_free_weights_and_the_loss_falls(tiny, x8):
    pruner = hp.ADMM(tiny, block=(1, 4), unify=0.5, zero=0.25, rho=0.05, admm_interval=2,
                     retrain_at=4)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    y = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    fit_full_batch(tiny, pruner, opt, x8, y, 4)
    assert pruner.phase == "retrain" and pruner.rounds == 1
    start = F.mse_loss(tiny(x8), y).item()
    fit_full_batch(tiny, pruner, opt, x8, y, 15)
    assert F.mse_loss(tiny(x8), y).item() < 0.5 * start


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 40), cols=st.integers(1, 40),
       scale=st.floats(1e-6, 1e3), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_penalty_function_gives_the_formulas_gradient_bit_for_bit(seed, rows, cols, scale, dtype):
    # the hand-written backward must train exactly as autograd of the penalty's formula
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=dtype, requires_grad=True)
    z, u = (torch.randn(rows, cols, generator=g, dtype=dtype) for _ in range(2))
    formula = scale * ((w - z + u) ** 2).sum()
    (expected,) = torch.autograd.grad(formula, w)
    value = _SquaredDistance.apply(w, z, u)
    (got,) = torch.autograd.grad(scale * value, w)
    assert torch.equal(got, expected)
    assert torch.allclose(scale * value, formula, rtol=1e-5 if dtype == torch.float32 else 1e-12)


def test_admm_phase_weight_is_the_weight_and_the_magnitudes_get_zero_gradients():
    w = torch.randn(8, 12, requires_grad=True)
    magnitude = torch.randn(24, requires_grad=True)
    out = _Unchanged.apply(w, magnitude)
    assert out.data_ptr() == w.data_ptr() and torch.equal(out, w)
    upstream = torch.randn(8, 12)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    assert torch.equal(magnitude.grad, torch.zeros(24))
