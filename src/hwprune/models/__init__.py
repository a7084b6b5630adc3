"""Model zoo: CIFAR ResNets (akamaster layout), a digits CNN, LeNet-5, MLPs and a char LSTM."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hwprune.errors import HwpruneError
from hwprune.models.char_lstm import CharLSTM, bits_per_character, sample_batch
from hwprune.models.densenet import (
    DenseBlock,
    DenseLayer,
    DenseNet,
    DenseTransition,
    densenet40,
    densenet_bc,
    densenet_bc100,
    densenet_cifar,
)
from hwprune.models.resnet18_cifar import ResNet18Cifar, resnet18_cifar
from hwprune.models.resnet_cifar import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    load_pretrained,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet_cifar,
)
from hwprune.models.small import MLP, LeNet5, SmallCNN
from hwprune.models.vgg import VGG, VGG16_CFG, vgg16_cifar

__all__ = [
    "MLP",
    "MODELS",
    "VGG",
    "VGG16_CFG",
    "BasicBlock",
    "CharLSTM",
    "CifarResNet",
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "DenseTransition",
    "LeNet5",
    "PadShortcut",
    "SmallCNN",
    "densenet40",
    "densenet_bc",
    "densenet_bc100",
    "densenet_cifar",
    "get_model",
    "load_pretrained",
    "ResNet18Cifar",
    "resnet110",
    "resnet18_cifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet_cifar",
    "vgg16_cifar",
    "bits_per_character",
    "sample_batch",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "lenet5": LeNet5,
    "mlp": MLP,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "densenet40": densenet40,
    "densenet_bc100": densenet_bc100,
    "vgg16": vgg16_cifar,
    "resnet18": resnet18_cifar,
    "char_lstm": CharLSTM,
}


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by registry name, passing ``kwargs`` to its constructor."""
    try:
        factory = MODELS[name]
    except (KeyError, TypeError):
        raise HwpruneError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(**kwargs)
