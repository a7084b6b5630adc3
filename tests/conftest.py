"""Small models built in the tests themselves (no data files needed), and the property tests'
profile."""

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from hwprune.models.resnet_cifar import BasicBlock

# CI (.ci/run) draws the same examples on every run, so that its outcome is the code's and not
# the draw's; elsewhere each run draws new ones, which is how hypothesis finds what CI would not
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "explore"))


class TinyNet(nn.Module):
    """conv -> conv(grouped option) -> conv -> linear -> linear, with BN: every structure fits."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, groups=groups)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyMLP(nn.Module):
    """Linear layers only (structures that need a kernel or columns do not apply)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 16)
        self.fc4 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.fc4(torch.relu(self.fc3(x)))


class TinyResidual(nn.Module):
    """A stem, two CIFAR-ResNet basic blocks (the second with a padding shortcut), a head:
    residual additions and BatchNorm after every conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 20)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0])


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the test machine is shared, and one thread is faster
    than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def x8():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def fit_full_batch(model, pruner, optimizer, x, y, steps):
    """Full-batch MSE training through the pruner's lifecycle (penalty, then step)."""
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()


# -- shared by the shrink and fold tests --------------------------------------------------------


def _randomize_bn(model, seed=0):
    """Running statistics and affine parameters away from their defaults, so a zero filter's
    BatchNorm output is a nonzero constant (the case that needs folding)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _max_diff(a, b, x):
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())
