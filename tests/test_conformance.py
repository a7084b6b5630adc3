"""The contract every registered method keeps (``hwprune.methods.checks``), run over every
method x every structure it supports x the test zoo, plus DistributedDataParallel on two
processes; and a toy method defined here, registered for one test, passes the same checks."""

import pytest
import torch
from torch import nn

from hwprune.errors import ConfigError, HwpruneError
from hwprune.methods import (
    Pruner,
    all_methods,
    get_method,
    register_method,
    unregister_method,
)
from hwprune.methods.checks import (
    CHECKS,
    check_masks_obey_structure,
    check_method,
    check_ranks_agree,
    check_resume_exact,
    method_arguments,
)
from hwprune.methods.selection import keep_all_but_lowest
from hwprune.parametrize import Mask
from hwprune.structures import parse_structure
from hwprune.targets import resolve_targets

from conftest import TinyMLP, TinyNet, TinyResidual


def _inputs(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


#: the test zoo: (model factory, a batch of inputs)
ZOO = {
    "mlp": (TinyMLP, _inputs(4, 16)),
    "cnn": (TinyNet, _inputs(4, 3, 8, 8)),
    "residual": (TinyResidual, _inputs(4, 3, 8, 8)),
}


def _applies(label, factory):
    """Whether every default target of the model can have the structure ``label`` (a column
    or a kernel needs a conv weight, so the MLP has neither)."""
    structure = parse_structure(label)
    try:
        for t in resolve_targets(factory()):
            structure.validate(tuple(getattr(t.module, t.param).shape), t.name)
    except HwpruneError:
        return False
    return True


CASES = [(spec, label, zoo) for spec in all_methods() for label in spec.structures
         for zoo in ZOO if _applies(label, ZOO[zoo][0])]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("spec, label, zoo", CASES,
                         ids=[f"{s.name}-{label}-{zoo}" for s, label, zoo in CASES])
def test_every_method_keeps_the_contract(spec, label, zoo, check):
    factory, inputs = ZOO[zoo]
    check(spec.cls, spec.config(label), factory, inputs)


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_every_structure_applies_to_the_residual_model_and_is_the_one_taken(spec):
    # the residual model fits every structure, so no (method, structure) goes unchecked
    for label in spec.structures:
        assert _applies(label, TinyResidual), (spec.name, label)
        pruner = spec.cls(TinyResidual(), **method_arguments(spec.cls, spec.config(label),
                                                              ZOO["residual"][1]))
        assert pruner.structure == parse_structure(label), (spec.name, label)


def test_ranks_agree_under_ddp_for_every_method():
    # one spawned pair for all methods (process start-up dominates); each method's first
    # structure, since what keeps ranks equal (sync of decisions, noise) is per method
    # plus DPP's feature-map rows, whose one sample per forward pass every member reads
    dpp = get_method("DPP")
    check_ranks_agree([(f"{spec.name}-{label}", spec.cls, spec.config(label), TinyResidual,
                        ZOO["residual"][1])
                       for spec in all_methods()
                       for label in (spec.structures[0],
                                     *(("filter", "map") if spec is dpp else ()))])


# -- a method of one's own: registered here, nowhere else -----------------------------------------


class ToyTopK(Pruner):
    """Keeps the ``keep`` fraction of groups of largest L1 norm, chosen again at every step."""

    def __init__(self, model, structure="element", keep=0.5, targets=None):
        self.keep = keep
        super().__init__(model, structure, targets)

    def _check_config(self):
        if str(self.structure) not in ("element", "filter"):
            raise ConfigError(f"ToyTopK supports element and filter; got {self.structure}")
        if not 0.0 < self.keep < 1.0:
            raise ConfigError(f"keep must be in (0, 1); got {self.keep!r}")

    def _make_parametrization(self, layer):
        return Mask(torch.ones(layer.shape, dtype=torch.bool))

    def _on_attach(self):
        self._on_step()

    def _on_step(self):
        for layer in self.layers.values():
            scores = layer.structure.scores(layer.original())
            keep = keep_all_but_lowest(scores, 1.0 - self.keep, 1)
            layer.parametrization.mask.copy_(
                layer.structure.expand(keep.float(), layer.shape) > 0.5)


TOY = {"configs": {"element": {"structure": "element", "keep": 0.5},
                   "filter": {"structure": "filter", "keep": 0.5}},
       "bad_settings": ({"keep": 1.5},)}


def test_a_method_registered_in_a_test_passes_the_checks_and_is_removed_after():
    from hwprune.app.recipe import method_class

    register_method(**TOY)(ToyTopK)
    try:
        spec = get_method("toytopk")
        assert spec in all_methods() and method_class("ToyTopK") is ToyTopK
        for label in spec.structures:
            for factory, inputs in ZOO.values():
                check_method(ToyTopK, spec.config(label), factory, inputs)
    finally:
        unregister_method("ToyTopK")
    assert ToyTopK not in [s.cls for s in all_methods()]
    with pytest.raises(ConfigError, match="unknown method 'ToyTopK'"):
        get_method("ToyTopK")


class PartialGroups(ToyTopK):
    """Breaks the structure: one weight of every removed filter stays."""

    def _mask(self, layer):
        mask = layer.parametrization.mask.clone()
        mask.view(mask.shape[0], -1)[:, 0] = True
        return mask


class ForgetfulNoise(ToyTopK):
    """Breaks resuming: a random perturbation from a generator that is not in its state."""

    def _on_attach(self):
        self.generator = torch.Generator().manual_seed(0)
        super()._on_attach()

    def _on_step(self):
        with torch.no_grad():
            for layer in self.layers.values():
                noise = torch.randn(layer.shape, generator=self.generator)
                layer.original().add_(1e-3 * noise)
        super()._on_step()


@pytest.mark.parametrize("broken, check, words", [
    (PartialGroups, check_masks_obey_structure, "filter groups partly kept"),
    (ForgetfulNoise, check_resume_exact, "differs after resuming"),
])
def test_the_checks_catch_a_broken_method(broken, check, words):
    register_method(**TOY)(broken)
    try:
        with pytest.raises(AssertionError, match=words):
            check(broken, TOY["configs"]["filter"], TinyNet, ZOO["cnn"][1])
    finally:
        unregister_method(broken.__name__)


def test_registering_twice_or_a_non_method_is_an_error():
    with pytest.raises(ConfigError, match="already registered"):
        register_method(**TOY)(type("psp", (ToyTopK,), {}))
    with pytest.raises(ConfigError, match="Pruner subclass"):
        register_method(**TOY)(nn.Linear)
