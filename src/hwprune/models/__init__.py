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
    "register_model",
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


def register_model(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add ``factory`` (a callable returning an ``nn.Module``) to ``MODELS`` under ``name``, so
    that recipes can name it (``model: {name: NAME}``); returns ``factory``. This is how your
    own models reach ``hwprune run``: call it in a Python file passed as ``--plugin FILE``.
    Registering a name again with the same factory does nothing; another factory is refused."""
    if not isinstance(name, str) or not name.isidentifier():
        raise HwpruneError(f"register_model: name {name!r}; allowed: a Python identifier "
                           "(letters, digits, underscores)")
    if not callable(factory):
        raise HwpruneError(f"register_model({name!r}): got {type(factory).__name__}; allowed: "
                           "a callable that returns a torch.nn.Module")
    if MODELS.get(name, factory) is not factory:
        raise HwpruneError(f"register_model: a model named {name!r} is already registered "
                           f"({getattr(MODELS[name], '__qualname__', MODELS[name])}); choose "
                           "another name")
    MODELS[name] = factory
    return factory
