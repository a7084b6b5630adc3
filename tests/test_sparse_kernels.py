"""hp.to_sparse_kernels: per-layer timed choice between dense and sparse Linear kernels.

Which kernel wins depends on the machine, so the tests force the decision with min_speedup
(0: take the fastest sparse candidate; inf: keep dense) and check what does not depend on
timing: the outputs, the candidates tried, the reasons. The CUDA 2:4 path is checked only where
the tests find no GPU: it must be skipped with its reason, never run.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hwprune.deploy.sparse_kernels import SparseLinear, is_2to4, to_sparse_kernels
from hwprune.errors import ConfigError


def _mlp(sparsity=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape, generator=g) < sparsity] = 0
    return model.eval()


def test_sparse_chosen_when_forced_gives_the_dense_output():
    model, x = _mlp(), torch.randn(16, 64)
    r = to_sparse_kernels(model, x, formats=("csr", "bsr"), min_speedup=0.0, repeats=3,
                          return_result=True)
    assert [c.chosen for c in r.layers] == [min(c.candidates_ms, key=c.candidates_ms.get)
                                           for c in r.layers]
    assert all(isinstance(m, SparseLinear) for m in (r.model[0], r.model[2]))
    assert all(c.dense_ms > 0 and c.candidates_ms["csr"] > 0 for c in r.layers)
    with torch.no_grad():
        assert torch.allclose(r.model(x), model(x), atol=1e-5)
        x3 = torch.randn(2, 5, 64)  # leading dims are kept
        assert torch.allclose(r.model(x3), model(x3), atol=1e-5)
    assert isinstance(model[0], nn.Linear)  # the input model is untouched


def test_dense_kept_with_the_measured_reason():
    model, x = _mlp(0.2), torch.randn(4, 64)
    r = to_sparse_kernels(model, x, min_speedup=float("inf"), repeats=2, return_result=True)
    assert all(c.chosen == "dense" for c in r.layers)
    assert isinstance(r.model[0], nn.Linear)
    c = r.layers[0]
    assert "below inf" in c.reason
    # 20 % zeros: no block size leaves half the blocks empty, so BSR is not even tried
    assert "bsr" not in c.candidates_ms and "half the blocks" in c.reason
    assert abs(c.sparsity - float((model[0].weight == 0).float().mean())) < 1e-9
    if not torch.cuda.is_available():
        assert "2:4 semi-structured kernels need a CUDA device" in c.reason
    assert "| 0 | 128x64 |" in r.to_markdown()


def test_bsr_block_size_follows_the_blocks():
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:16, :16] = 1.0  # one 16x16 block of 8 is nonzero
    r = to_sparse_kernels(nn.Sequential(lin), torch.randn(3, 64), formats=("bsr",),
                          min_speedup=0.0, repeats=2, return_result=True)
    assert r.model[0].weight.layout == torch.sparse_bsr
    assert tuple(r.model[0].weight.values().shape[-2:]) == (16, 16)


def test_bad_arguments():
    model = _mlp()
    with pytest.raises(ConfigError, match="formats"):
        to_sparse_kernels(model, torch.randn(2, 64), formats=("coo",))
    with pytest.raises(ConfigError, match="min_speedup"):
        to_sparse_kernels(model, torch.randn(2, 64), min_speedup=-1)
    with pytest.raises(ConfigError, match="repeats"):
        to_sparse_kernels(model, torch.randn(2, 64), repeats=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 4), st.integers(0, 2**16))
def test_is_2to4(rows, runs, keep, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 4 * runs, generator=g)
    order = torch.rand(rows, runs, 4, generator=g).argsort(-1)
    mask = order < keep  # exactly `keep` nonzeros per run of 4
    w = (w.reshape(rows, runs, 4) * mask).reshape(rows, 4 * runs)
    assert is_2to4(w) == (keep <= 2)
    assert not is_2to4(torch.zeros(2, 6))  # a row that is not a whole number of runs
