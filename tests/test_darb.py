"""DARB: block-max masks keep exactly their count per block, block sizes come from the allowed
set and follow row density, the ratio is hit within the documented tolerance, the decoding
cost matches a hand count, bad input is refused before the model is touched, and retraining
with the masks fixed works on Linear, Conv and LSTM weights."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import hwprune as hp
from hwprune.errors import ConfigError, LifecycleError, StructureError
from hwprune.hardware import block_kept, decoding_cost
from hwprune.methods.darb import DEFAULT_ALLOWED, assign_block_sizes, bmwm_mask
from hwprune.schedules import Linear

from conftest import TinyLSTM, fit_full_batch


def _blocks_keep_exactly(mask: torch.Tensor, sizes, m: int) -> bool:
    """Every block of every im2col row keeps min(m, block length) weights."""
    rows = mask.reshape(mask.shape[0], -1)
    for r in range(rows.shape[0]):
        b = int(sizes[r]) if not isinstance(sizes, int) else sizes
        for start in range(0, rows.shape[1], b):
            block = rows[r, start:start + b]
            if int(block.sum()) != min(m, block.numel()):
                return False
    return True


def _tolerance(cols: int, sizes, m: int) -> float:
    """The documented per-layer bound on |kept - rows*cols/ratio|, per row: max_step / 2."""
    steps = [m * (math.ceil(cols / a) - math.ceil(cols / b))
             for a, b in zip(sizes, sizes[1:], strict=False)]
    return max(steps, default=0) / 2


def _row_scaled(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A weight whose rows have very different magnitudes, so the reference pruning leaves
    them very differently dense (like irregularly pruned LSTM rows, up to 14x apart)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, rows)[torch.randperm(rows, generator=g)]
    return torch.randn(rows, cols, generator=g) * scale[:, None]


# -- block-max weight masking ---------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), b=st.integers(1, 12),
       m=st.integers(1, 4), conv=st.booleans(), seed=st.integers(0, 10_000))
def test_bmwm_keeps_exactly_m_per_block_any_shape(rows, cols, b, m, conv, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, cols, 1, 1) if conv else (rows, cols)
    w = torch.randn(shape, generator=g)
    mask = bmwm_mask(w, b, m)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert _blocks_keep_exactly(mask, b, m)
    assert int(mask.sum()) == rows * block_kept(cols, b, m)
    # the kept ones are the largest |w| of their block
    flat, keep = w.reshape(rows, cols).abs(), mask.reshape(rows, cols)
    for start in range(0, cols, b):
        blk, kb = flat[:, start:start + b], keep[:, start:start + b]
        if (~kb).any():
            assert (blk.masked_fill(~kb, math.inf).amin(1) >= blk.masked_fill(kb, -1).amax(1)).all()


def test_bmwm_per_row_sizes_and_hand_example():
    w = torch.tensor([[1., -5., 2., 3., 0.5, 4., -6., 7.],
                      [9., 1., 1., 1., 1., 1., 1., 2.]])
    mask = bmwm_mask(w, torch.tensor([2, 4]))
    assert mask.tolist() == [[False, True, False, True, False, True, False, True],
                             [True, False, False, False, False, False, False, True]]
    # ties keep the lower position, so masks are deterministic
    assert bmwm_mask(torch.ones(1, 6), 3).tolist() == [[True, False, False, True, False, False]]


def test_single_block_size_darb_is_magnitude_one_of_b():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 4)), None
    b = copy.deepcopy(a)
    darb = hp.DARB(a, 8.0, allowed=(8,), targets=["0"])
    mag = hp.Magnitude(b, "1:8", targets=["0"])
    assert torch.equal(darb.masks()["0.weight"], mag.masks()["0.weight"])


# -- block sizes: allowed set, density order, ratio ------------------------------------------


def test_block_sizes_are_allowed_and_follow_density():
    rows, cols = 96, 128
    w = _row_scaled(rows, cols)
    model = nn.Sequential(nn.Linear(cols, rows), nn.ReLU(), nn.Linear(rows, 3))
    with torch.no_grad():
        model[0].weight.copy_(w)
    pruner = hp.DARB(model, 8.0)
    sizes = pruner.block_sizes["0.weight"]
    assert set(sizes.tolist()) <= set(DEFAULT_ALLOWED)
    assert len(set(sizes.tolist())) >= 3, "rows this different must get different blocks"
    # the reference (irregular magnitude to 8x) row densities
    ref = torch.zeros(rows * cols, dtype=torch.bool)
    ref[w.abs().reshape(-1).argsort(descending=True)[:rows * cols // 8]] = True
    nnz = ref.reshape(rows, cols).sum(1)
    for i in range(rows):
        for j in range(rows):
            if nnz[i] > nnz[j]:
                assert sizes[i] <= sizes[j], (i, j)
    assert _blocks_keep_exactly(pruner.masks()["0.weight"], sizes, 1)


@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0, 13.0, 16.0, 25.0])
@pytest.mark.parametrize("m", [1, 2])
def test_ratio_within_documented_tolerance(ratio, m):
    rows, cols = 64, 256
    model = nn.Sequential(nn.Linear(cols, rows), nn.Linear(rows, 2))
    with torch.no_grad():
        model[0].weight.copy_(_row_scaled(rows, cols, seed=int(ratio)))
    pruner = hp.DARB(model, ratio, m=m)
    mask = pruner.masks()["0.weight"]
    target = rows * cols / ratio
    sizes = pruner.allowed_sizes["0.weight"]
    assert abs(int(mask.sum()) - target) <= _tolerance(cols, sizes, m)
    assert abs(int(mask.sum()) - target) / target < 0.02
    assert _blocks_keep_exactly(mask, pruner.block_sizes["0.weight"], m)
    assert set(pruner.block_sizes["0.weight"].tolist()) <= set(sizes)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 30), cols=st.integers(4, 100), seed=st.integers(0, 1000),
       frac=st.floats(0.0, 1.0))
def test_assignment_is_closest_and_monotone(rows, cols, seed, frac):
    g = torch.Generator().manual_seed(seed)
    nnz = torch.randint(0, cols + 1, (rows,), generator=g)
    sizes = [b for b in DEFAULT_ALLOWED if b <= cols]
    lo, hi = rows * block_kept(cols, sizes[-1]), rows * block_kept(cols, sizes[0])
    target = lo + frac * (hi - lo)
    b = assign_block_sizes(nnz, cols, target, sizes)
    kept = sum(block_kept(cols, int(x)) for x in b)
    assert abs(kept - target) <= _tolerance(cols, sizes, 1)
    assert set(b.tolist()) <= set(sizes)
    for i in range(rows):
        for j in range(rows):
            if nnz[i] > nnz[j]:
                assert b[i] <= b[j]


def test_reference_masks_from_another_pruning_set_the_densities():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 2))
    ref = torch.zeros(8, 64, dtype=torch.bool)
    ref[:4, :32] = True  # rows 0-3 dense (32 survivors), rows 4-7 sparse (2 survivors)
    ref[4:, :2] = True
    pruner = hp.DARB(model, 4.0, reference={"0.weight": ref})
    sizes = pruner.block_sizes["0.weight"]
    assert sizes[:4].max() < sizes[4:].min()


# -- decoding cost ---------------------------------------------------------------------------


def test_decoding_cost_matches_a_hand_count():
    # a 2 x 8 matrix; row 0 keeps columns 1, 3, 5, 7; row 1 keeps columns 0 and 7
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 3, 5, 7]] = True
    mask[1, [0, 7]] = True
    # CSR: 6 column indices of ceil(log2 8) = 3 bits, 3 row pointers of ceil(log2 7) = 3 bits
    csr = decoding_cost(mask, "csr")
    assert (csr["kept"], csr["index_bits"]) == (6, 6 * 3 + 3 * 3)
    assert csr["index_bits_per_kept"] == 27 / 6 and csr["selection_width"] == 8
    # DARB with row 0 in blocks of 2 and row 1 in blocks of 4: 4*1 + 2*2 position bits, plus
    # 2 rows * ceil(log2 7 allowed sizes) = 6 bits; widths: 4 weights via 2:1, 2 via 4:1
    darb = decoding_cost(mask, "darb", block_sizes=torch.tensor([2, 4]), allowed=DEFAULT_ALLOWED)
    assert darb["index_bits"] == 4 * 1 + 2 * 2 + 2 * 3
    assert darb["selection_width"] == (4 * 2 + 2 * 4) / 6
    assert darb["selection_inputs_per_kept"] == (4 * 2 + 2 * 4) / 6
    # BMWM, one block of 2 for both rows (mask of 1:2 = 8 kept): 1 bit each, no row codes
    bm = decoding_cost(bmwm_mask(torch.randn(2, 8), 2), "bmwm", block_sizes=2)
    assert (bm["kept"], bm["index_bits"], bm["selection_width"]) == (8, 8, 2.0)
    # block 2x4: 2 tiles, one bit each; row 0 cols 4-7 and row 1 col 7 -> tile (0, 1) kept,
    # and tile (0, 0) (row 0 cols 1, 3; row 1 col 0): both kept, 16 stored weights; one
    # 2-position selection per tile
    blk = decoding_cost(mask, "block", block=(2, 4))
    assert (blk["kept"], blk["index_bits"], blk["selection_width"]) == (16, 2, 2.0)
    assert blk["selections_per_kept"] == 2 / 16
    one_tile = torch.zeros(3, 5, dtype=torch.bool)
    one_tile[2, 4] = True  # a ragged corner tile of 1 real weight (tiles 2x4 -> 2 x 2 tiles)
    assert decoding_cost(one_tile, "block", block=(2, 4))["kept"] == 1
    assert decoding_cost(one_tile, "block", block=(2, 4))["index_bits"] == 4


def test_report_extras_carry_block_sizes_and_decoding_cost():
    torch.manual_seed(0)
    model = TinyLSTM()
    pruner = hp.DARB(model, 4.0, targets=nn.LSTM)
    tokens = torch.randint(0, 20, (2, 5))
    rep = hp.report(model, (tokens,), pruner=pruner)
    rows = {r.name: r for r in rep.rows}
    extras = rows["lstm.weight_hh_l1"].extras
    assert len(extras["block_sizes"]) == 64
    expected = decoding_cost(pruner.masks()["lstm.weight_hh_l1"], "darb",
                             block_sizes=pruner.block_sizes["lstm.weight_hh_l1"],
                             allowed=pruner.allowed_sizes["lstm.weight_hh_l1"])
    assert extras["index_bits_per_kept"] == expected["index_bits_per_kept"]
    assert extras["selection_width"] == expected["selection_width"]
    # the default allowed set is cut to what fits rows of 8 (the embedding input)
    assert pruner.allowed_sizes["lstm.weight_ih_l0"] == (1, 2, 4, 8)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"ratio": 1.0}, ConfigError, "ratio must be a finite number > 1"),
    ({"ratio": 0.5}, ConfigError, "ratio must be"),
    ({"ratio": True}, ConfigError, "ratio must be"),
    ({"ratio": 4.0, "allowed": (2, 4, 512)}, StructureError, r"conv2.weight: allowed block "
                                                            r"sizes \[512\] do not fit"),
    ({"ratio": 4.0, "allowed": (2, 4), "m": 2}, ConfigError, "m=2 must be smaller"),
    ({"ratio": 4.0, "allowed": (4, 8), "m": 4}, ConfigError, "m=4 must be smaller"),
    ({"ratio": 4.0, "m": 0}, ConfigError, "m .* must be an int >= 1"),
    ({"ratio": 4.0, "allowed": ()}, ConfigError, "allowed must be a non-empty"),
    ({"ratio": 4.0, "allowed": (2, 2)}, ConfigError, "distinct"),
    ({"ratio": 100.0}, ConfigError, "conv2.weight: ratio 100 is outside"),
    ({"ratio": 1.5, "m": 2}, ConfigError, r"ratio 1.5 is outside .*\(4, 8, 16, 32, 64\)"),
    ({"ratio": 4.0, "reference": "admm"}, ConfigError, "reference must be"),
    ({"ratio": 4.0, "reference": {}}, ConfigError, "reference mask for conv2.weight"),
    ({"ratio": 4.0, "schedule": "cubic"}, ConfigError, "schedule must be"),
])
def test_bad_input_is_refused_before_the_model_is_touched(tiny, kwargs, error, match):
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(error, match=match):
        hp.DARB(tiny, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in tiny.modules())
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


# -- retraining, schedules, finalize ---------------------------------------------------------


def test_retraining_keeps_masks_fixed_and_learns(tiny, x8):
    teacher = copy.deepcopy(tiny).eval()
    with torch.no_grad():
        y = teacher(x8)
        for p in tiny.parameters():
            p.add_(0.3 * torch.randn_like(p))
    pruner = hp.DARB(tiny, 4.0)
    masks = pruner.masks()
    opt = torch.optim.Adam(pruner.param_groups(lr=1e-2))
    tiny.eval()
    before = F.mse_loss(tiny(x8), y).item()
    fit_full_batch(tiny, pruner, opt, x8, y, 50)
    after = F.mse_loss(tiny(x8), y).item()
    assert after < 0.2 * before
    for name, m in pruner.masks().items():
        assert torch.equal(m, masks[name])
    model = pruner.finalize()
    for name, m in masks.items():
        assert torch.equal(model.get_parameter(name) != 0, m)
    with pytest.raises(LifecycleError):
        pruner.step()


def test_gradual_schedule_ramps_the_ratio_to_the_target(tiny, x8):
    pruner = hp.DARB(tiny, 8.0, schedule=Linear(0, 12, every=4))
    opt = torch.optim.SGD(pruner.param_groups(lr=0.01))
    ratios = []
    for _ in range(12):
        loss = tiny(x8).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        ratios.append(1 / (1 - pruner.sparsity()))
    assert ratios[0] == pytest.approx(1.0)  # step 0 is the schedule's start: nothing pruned
    assert all(a <= b + 1e-9 for a, b in zip(ratios, ratios[1:], strict=False))
    # Linear ramp of sparsity to 1 - 1/8: steps 4, 8, 12 at ratio 1/(1 - 0.875 * t/12)
    for t in (4, 8, 12):
        assert ratios[t - 1] == pytest.approx(1 / (1 - 0.875 * t / 12), rel=0.05)
    for name, mask in pruner.masks().items():
        cols = mask[0].numel()
        target = mask.numel() / 8.0
        assert abs(int(mask.sum()) - target) <= _tolerance(cols, pruner.allowed_sizes[name], 1)
        assert _blocks_keep_exactly(mask, pruner.block_sizes[name], 1)


def test_conv_linear_and_lstm_weights():
    torch.manual_seed(0)
    lstm = TinyLSTM()
    pruner = hp.DARB(lstm, 4.0, targets=(nn.LSTM, nn.Linear))
    assert set(pruner.masks()) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
                                   "lstm.weight_hh_l1", "head.weight"}
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.LazyLinear(2))
    conv(torch.randn(1, 3, 8, 8))
    cp = hp.DARB(conv, 4.0, targets=nn.Conv2d)
    for name, mask in {**pruner.masks(), **cp.masks()}.items():
        sizes = (pruner if name in pruner.layers else cp).block_sizes[name]
        assert _blocks_keep_exactly(mask, sizes, 1), name
    assert 3.5 < 1 / (1 - cp.sparsity()) < 4.5


def test_admm_masks_as_the_reference():
    # ADMM's projection without training is exact magnitude pruning of single weights, so its
    # masks as the reference must give the block sizes of DARB's own magnitude reference
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 2))
    model[0].weight.data.mul_(torch.logspace(-1, 1, 32)[torch.randperm(32)][:, None])
    shadow, own = copy.deepcopy(model), copy.deepcopy(model)
    admm = hp.ADMM(shadow, block=(1, 1), unify=0.0, zero=0.75, targets=["0"])
    admm.hard_project()
    pruner = hp.DARB(model, 4.0, reference=admm.masks(), targets=["0"])
    assert torch.equal(pruner.block_sizes["0.weight"],
                       hp.DARB(own, 4.0, targets=["0"]).block_sizes["0.weight"])
    assert len(set(pruner.block_sizes["0.weight"].tolist())) >= 3


def test_gru_weights():
    model = nn.GRU(16, 32, num_layers=1)
    pruner = hp.DARB(model, 8.0, targets=nn.GRU)
    for name, mask in pruner.masks().items():
        assert mask.shape[0] == 96  # three gates of 32
        assert _blocks_keep_exactly(mask, pruner.block_sizes[name], 1)
    assert 7.5 < 1 / (1 - pruner.sparsity()) < 8.5
