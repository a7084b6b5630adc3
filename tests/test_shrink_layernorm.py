"""LayerNorm over the channels (ConvNeXt's blocks and its LayerNorm2d): a channel whose input is
a known constant leaves the norm, which keeps dividing by the original width; the "map"
structure zeroes the norm's entries with the map, so shrink removes residual-stream maps."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hwprune as hp
from hwprune.deploy import feature_maps
from hwprune.deploy.shrink.norms import NarrowedLayerNorm
from test_shrink_follows import Block  # ConvNeXt's block: depthwise conv, channels-last norm

pytestmark = pytest.mark.usefixtures("one_thread")


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: F.layer_norm on channels-last data, traced into by torch.fx."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """stem (conv + LayerNorm2d, 8 maps) -> two blocks -> downsampling (LayerNorm2d + conv, 16
    maps) -> a block -> pooled, channels LayerNorm -> classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8, eps=1e-6))
        self.b1, self.b2 = Block(8), Block(8)
        self.down = nn.Sequential(LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, stride=2))
        self.b3 = Block(16)
        self.head_norm, self.head = nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        y = self.b3(self.down(self.b2(self.b1(self.stem(x)))))
        return self.head(self.head_norm(y.mean((2, 3))))


def _trained_like(model):
    torch.manual_seed(0)
    with torch.no_grad():  # norms away from their (1, 0) start, as after training
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _close(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max()) <= 1e-5 * float(ya.abs().max())


@settings(max_examples=40, deadline=None)
@given(width=st.integers(2, 24), data=st.data())
def test_narrowed_layernorm_equals_the_full_norm_with_the_constants_put_back(width, data):
    removed = data.draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=width - 1,
                                 unique=True))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    keep = [c for c in range(width) if c not in removed]
    const = torch.randn(len(removed), generator=g) * data.draw(st.sampled_from([0.0, 1.0, 5.0]))
    w, b = torch.randn(width, generator=g), torch.randn(width, generator=g)
    x = torch.randn(3, 5, width, generator=g)
    x[..., removed] = const
    full = F.layer_norm(x, (width,), w, b, 1e-5)
    narrow = NarrowedLayerNorm(width, const, w[keep], b[keep], 1e-5)
    got = narrow(x[..., keep])
    assert torch.allclose(got, full[..., keep], atol=1e-5 * float(full.abs().max()) + 1e-6)
    assert got.is_contiguous()  # what the next layer reads, as it read the original norm's
    # fine-tuning the shrunk model: the kept inputs' gradients are the original norm's (in
    # float64, where summation order cannot matter: a norm of two nearly equal channels has a
    # gradient at rounding level in float32)
    x = x.double().requires_grad_(True)
    full = F.layer_norm(x, (width,), w.double(), b.double(), 1e-5)
    kept = x.detach()[..., keep].requires_grad_(True)
    got = narrow.double()(kept)
    upstream = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (full[..., keep] * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert torch.allclose(kept.grad, x.grad[..., keep], rtol=1e-9, atol=1e-9)


def test_map_groups_hold_the_channel_norms_entries():
    model = _trained_like(ConvNeXtLike())
    fm = feature_maps(model, torch.randn(2, 3, 16, 16))
    stream = [g for g in fm.groups if any(m.param == "stem.1.weight" for m in g.members)]
    assert len(stream) == 8  # one map per channel of the first stage's residual stream
    params = {m.param for m in stream[0].members if m.writes}
    # the stem's conv and LayerNorm2d, each block's depthwise conv, last linear layer (the
    # block norms' entries: they write the norm's output, which the first linear reads)
    assert {"stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias", "b1.dw.weight",
            "b1.norm.weight", "b1.norm.bias", "b1.fc2.weight", "b2.fc2.bias",
            "down.0.weight", "down.0.bias"} <= params
    readers = {m.param for m in stream[0].members if not m.writes}
    assert readers == {"b1.fc1.weight", "b2.fc1.weight", "down.1.weight"}


def test_map_magnitude_then_shrink_removes_half_of_every_residual_stream():
    model = _trained_like(ConvNeXtLike())
    x = torch.randn(2, 3, 16, 16)
    hp.Magnitude(model, "map", sparsity=0.5, example_inputs=x).finalize()
    r = hp.shrink(model, x, return_result=True)
    assert r.layers["stem.1"] == ((8, 8), (4, 4))  # LayerNorm2d: rewritten from F.layer_norm
    assert r.layers["b1.norm"] == ((8, 8), (4, 4))
    assert r.layers["down.1"] == ((8, 16), (4, 8))
    assert r.layers["head_norm"] == ((16, 16), (8, 8))
    assert r.layers["b3.fc2"] == ((64, 16), (32, 8))
    norms = [m for m in r.model.modules() if isinstance(m, NarrowedLayerNorm)]
    assert len(norms) == 6 and all(n.removed.numel() * 2 == n.width for n in norms)
    y = torch.randn(3, 3, 16, 16)
    assert _close(model, r.model, y)
    assert _close(model, hp.fold_batchnorm(r.model, x), y)  # the narrowed norms trace


def test_a_removed_channel_with_a_nonzero_constant_keeps_its_share_of_the_statistics():
    torch.manual_seed(0)
    model = _trained_like(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)))
    with torch.no_grad():
        model[0].weight[[2, 5]] = 0  # inputs 2 and 5 of the norm: their biases, constants
        model[1].weight[[2, 5]] = 0  # outputs 2 and 5: the norm's biases (the last layer's
        # bias takes them)
    x = torch.randn(7, 6)
    r = hp.shrink(model, x, return_result=True)
    assert r.layers["1"] == ((8, 8), (6, 6))
    norm = r.model[1]
    assert isinstance(norm, NarrowedLayerNorm)
    assert torch.equal(norm.removed, model[0].bias.detach()[[2, 5]])
    assert bool((norm.removed != 0).all())
    assert _close(model, r.model, torch.randn(9, 6))
    assert _close(model, hp.fold_batchnorm(r.model, x), torch.randn(9, 6))


def test_a_channel_whose_input_varies_stays_with_the_reason():
    torch.manual_seed(0)
    model = _trained_like(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)))
    with torch.no_grad():
        model[1].weight[4] = model[1].bias[4] = 0  # output 4 is zero, input 4 varies
    r = hp.shrink(model, torch.randn(7, 6), return_result=True)
    assert r.params_after == r.params_before
    reasons = [k.reason for k in r.kept if 4 in k.channels]
    assert reasons and "input varies" in reasons[0] and "normalises over the channel" in reasons[0]


def test_a_norm_over_the_channels_and_more_axes_keeps_every_channel():
    model = _trained_like(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 5, 5]),
                                        nn.Conv2d(4, 2, 1)))
    with torch.no_grad():
        model[0].weight[1] = model[0].bias[1] = 0
        model[2].weight[:, 1] = 0
    r = hp.shrink(model, torch.randn(2, 3, 5, 5), return_result=True)
    assert r.params_after == r.params_before
    assert any("and others" in k.reason for k in r.kept)
