"""Shrink follows channel shuffles written with view / transpose / view (ShuffleNet) and
``chunk`` along the channel axis: the permuted classes reach the layers after them, and a
grid's columns go together so that the shuffle and the chunk stay valid on fewer channels."""

import pytest
import torch
from torch import nn

import hwprune as hp


def channel_shuffle(x, groups: int, swap: str = "function"):
    """As torchvision's ShuffleNetV2: the sizes come from ``x.size()``."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    if swap == "function":
        x = torch.transpose(x, 1, 2)
    elif swap == "method":
        x = x.transpose(2, 1)
    else:
        x = x.permute(0, 2, 1, 3, 4)
    return x.contiguous().view(batch, channels, height, width)


class Shuffle(nn.Module):
    """conv1 (8 channels) -> shuffle into a grid of 2 x 4 -> conv2."""

    def __init__(self, swap: str = "function", fixed: bool = False):
        super().__init__()
        self.swap, self.fixed = swap, fixed
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.conv1(x).relu()
        if self.fixed:  # the sizes written as numbers: they do not follow a narrowed tensor
            n, _, h, w = x.shape
            x = x.view(n, 2, 4, h, w).transpose(1, 2).contiguous().view(n, 8, h, w)
        else:
            x = channel_shuffle(x, 2, self.swap)
        return self.conv2(x)


def _branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, stride, 1, groups=cout, bias=False), nn.BatchNorm2d(cout),
        nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Unit(nn.Module):
    """ShuffleNetV2's unit: stride 2 concatenates two branches, stride 1 chunks the input
    in two and concatenates the first half with a branch of the second; then a shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.branch2 = _branch(cin if stride > 1 else half, half, stride)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.units = nn.Sequential(Unit(8, 16, 2), Unit(16, 16, 1), Unit(16, 16, 1))
        self.head = nn.Sequential(nn.Conv2d(16, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        return self.head(self.units(self.stem(x)))


class Chunked(nn.Module):
    """conv (8 channels) -> chunk in two -> a conv on each half, added."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 1)

    def forward(self, x):
        lo, hi = torch.chunk(self.conv(x).relu(), 2, 1)
        return self.a(lo) + self.b(hi)


def _close(a, b, x) -> bool:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max()) <= 1e-5 * float(ya.abs().max())


@pytest.mark.parametrize("swap", ["function", "method", "permute"])
def test_a_shuffle_carries_its_permutation_to_the_next_layer(swap):
    torch.manual_seed(0)
    model = Shuffle(swap).eval()
    with torch.no_grad():
        # after the shuffle, positions 2 and 3 are grid column 1: conv1's filters 1 and 5
        model.conv2.weight[:, [2, 3]] = 0
        model.conv2.weight[:, 4] = 0  # half a column (filter 2's partner 6 is read): stays
    x = torch.randn(2, 3, 6, 6)
    r = hp.shrink(model, x, return_result=True)
    assert r.layers == {"conv1": ((3, 8), (3, 6)), "conv2": ((8, 5), (6, 5))}
    assert not any("view" in k.reason for k in r.kept)
    assert _close(model, r.model, torch.randn(3, 3, 6, 6))


def test_a_shuffle_with_sizes_fixed_in_the_code_keeps_its_channels_and_says_why():
    torch.manual_seed(0)
    model = Shuffle(fixed=True).eval()
    with torch.no_grad():
        model.conv2.weight[:, [2, 3]] = 0
    r = hp.shrink(model, torch.randn(2, 3, 6, 6), return_result=True)
    assert "conv1" not in r.layers
    assert any(k.where == "conv1" and "view" in k.reason for k in r.kept)


def test_chunk_pieces_lose_the_same_columns():
    torch.manual_seed(0)
    model = Chunked().eval()
    with torch.no_grad():
        model.a.weight[:, 0] = 0
        model.b.weight[:, 0] = 0  # column 0: channels 0 and 4 of conv, both unread
        model.a.weight[:, 1] = 0  # channel 1 alone: its partner 5 is read, so both stay
    x = torch.randn(2, 3, 6, 6)
    r = hp.shrink(model, x, return_result=True)
    assert r.layers["conv"] == ((3, 8), (3, 6))
    assert r.layers["a"] == ((4, 6), (3, 6)) and r.layers["b"] == ((4, 6), (3, 6))
    assert _close(model, r.model, torch.randn(3, 3, 6, 6))


def test_shufflenet_maps_match_a_hand_count_and_shrink_whole():
    torch.manual_seed(0)
    model, x = ShuffleNetLike().eval(), torch.randn(2, 3, 16, 16)
    maps = hp.deploy.feature_maps(model, x)
    # the stem's 8 (tied through unit 0's depthwise conv), 8 inside each unit's branch2, the
    # head's 12 and the stream: unit 0's 8 columns, halved by each later unit's chunk and
    # shuffle to 2
    assert len(maps.groups) == 8 + 3 * 8 + 12 + 2
    assert {e.reason for e in maps.excluded} == {"reaches the model's output"}
    pruned = hp.Magnitude(model, "map", 0.5, example_inputs=x).finalize()
    r = hp.shrink(pruned, x, return_result=True)
    assert r.params_after < 0.6 * r.params_before
    assert r.kept == []  # every zeroed map went
    assert _close(pruned, r.model, torch.randn(3, 3, 16, 16))
