"""The layer that produces the output is never a default target, whatever its type."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.targets import output_layers, resolve_targets


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1(s)), torch.relu(self.expand3(s))], 1)


class SqueezeNetLike(nn.Module):
    """torchvision's SqueezeNet layout: the classifier is a 1x1 conv, then pool and flatten."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(),
                                      Fire(16, 8, 16), Fire(32, 8, 16))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def test_squeezenet_classifier_conv_is_not_a_default_target():
    model = SqueezeNetLike()
    names = [t.name for t in resolve_targets(model)]
    assert "classifier.1.weight" not in names
    assert "features.0.weight" not in names  # the first conv, as before
    assert names == ["features.2.squeeze.weight", "features.2.expand1.weight",
                     "features.2.expand3.weight", "features.3.squeeze.weight",
                     "features.3.expand1.weight", "features.3.expand3.weight"]
    pruner = hp.Magnitude(model, "filter", 0.3)
    pruner.finalize()
    assert (model.classifier[1].weight.flatten(1) != 0).any(1).all()  # no class filter zeroed


def test_every_layer_on_a_path_to_the_output_stays_dense():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)
            self.aux = nn.Linear(8, 2)  # registered last, but not the last layer of a path

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"logits": self.a(h) + self.b(h), "aux": nn.functional.softmax(self.aux(h), 1)}

    model = TwoHeads()
    assert output_layers(model) == {"a", "b", "aux"}
    assert [t.name for t in resolve_targets(model)] == ["body.weight"]
    assert [t.name for t in resolve_targets(model, "*")] == [
        "body.weight", "a.weight", "b.weight", "aux.weight"]  # named targets still select them


def test_an_untraceable_model_falls_back_to_the_last_linear_with_a_reason():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv2(self.conv1(x)).mean((2, 3))
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.fc2(self.fc1(x))

    with pytest.warns(UserWarning, match=r"torch.fx cannot trace Branchy .*fc2\.weight"):
        names = [t.name for t in resolve_targets(Branchy())]
    assert names == ["conv2.weight", "fc1.weight"]


def test_traceable_models_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_targets(SqueezeNetLike())


def test_an_output_from_inside_a_module_traced_whole_falls_back_with_its_name():
    model = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 16),
                          nn.TransformerEncoderLayer(16, 2, 32, batch_first=True))
    with pytest.warns(UserWarning, match=r"output comes through 2 \(TransformerEncoderLayer\)"):
        names = [t.name for t in resolve_targets(model)]
    assert names[:2] == ["0.weight", "1.weight"] and "2.linear2.weight" not in names
