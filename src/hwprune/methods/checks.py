"""The contract every pruning method keeps, as functions that check one method on one model,
the way scikit-learn's ``check_estimator`` checks an estimator.

::

    from hwprune.methods.checks import check_method
    check_method(MyMethod, {"structure": "channel", "sparsity": 0.5}, make_model, inputs)

``check_method`` runs every check in ``CHECKS`` on a configuration of a *registered* method
(``hwprune.methods.register_method``); each check builds its own model with
``model_factory()`` (called after ``torch.manual_seed``), trains ``STEPS`` steps of mean
squared error against random targets (``pruner.penalty()``, ``step()``, ``epoch_end()`` every
``EPOCH`` steps) on ``inputs`` plus per-step noise, and raises ``AssertionError`` naming what
broke. A ``"map"`` configuration is given ``example_inputs=inputs`` (``method_arguments``).
``check_ranks_agree`` runs configurations under DistributedDataParallel on two CPU
processes. tests/test_conformance.py runs them over every registered method and structure.
"""

from __future__ import annotations

import copy
import io
import os
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..deploy.shrink.maps import FeatureMaps
from ..errors import HwpruneError, LifecycleError, TargetError
from ..structures import FeatureMap, KofN, Structure
from .registry import get_method

__all__ = ["STEPS", "EPOCH", "CHECKS", "UNSUPPORTED_CANDIDATES", "check_method",
           "check_trains_and_prunes", "check_masks_obey_structure", "check_finalize",
           "check_resume_exact", "check_rejects_bad_input", "check_ranks_agree",
           "train_steps", "structure_violations", "map_violations", "method_arguments"]

STEPS, EPOCH = 8, 2
#: structures handed to a method's ``structure_arg`` that it does not list: each must be refused
UNSUPPORTED_CANDIDATES = ("element", "filter", "channel", "kernel", "column", "layer", "2:4",
                          "block:2x2", "map")
ModelFactory = Callable[[], nn.Module]


# -- shared steps ---------------------------------------------------------------------------------
def method_arguments(cls: type, config: Mapping[str, Any], inputs: Tensor | None
                     ) -> dict[str, Any]:
    """The constructor's keyword arguments for ``config``: a copy, with
    ``example_inputs=inputs`` where the structure is ``"map"`` (the maps are traced)."""
    kwargs = copy.deepcopy(dict(config))
    spec = kwargs.get(get_method(cls).structure_arg)
    if isinstance(spec, FeatureMap) or (isinstance(spec, str) and spec.strip().lower() == "map"):
        kwargs.setdefault("example_inputs", inputs)
    return kwargs


def _build(cls: type, config: Mapping[str, Any], model_factory: ModelFactory, inputs: Tensor,
           seed: int = 0) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = model_factory()
    pruner = cls(model, **method_arguments(cls, config, inputs))
    optimizer = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    return model, pruner, optimizer


def train_steps(model: nn.Module, pruner: Any, optimizer: torch.optim.Optimizer, inputs: Tensor,
                steps: int) -> None:
    """``steps`` optimizer steps through the pruner's lifecycle. Each step's noise and targets
    are seeded by ``pruner.steps``, so a resumed run sees the same data as a straight one."""
    model.train()
    for _ in range(steps):
        g = torch.Generator().manual_seed(1000 + pruner.steps)
        x = inputs + 0.1 * torch.randn(inputs.shape, generator=g)
        out = model(x)
        loss = F.mse_loss(out, torch.randn(out.shape, generator=g)) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
        if pruner.steps % EPOCH == 0:
            pruner.epoch_end()


def structure_violations(structure: Structure, mask: Tensor) -> list[str]:
    """What in ``mask`` breaks ``structure``: a group partly kept, or a k-of-n run that does not
    keep exactly k groups. Empty when the mask obeys it exactly."""
    valid = structure.to_groups(torch.ones(mask.shape)) > 0  # block padding is not a weight
    kept = (structure.to_groups(mask.float().cpu()) > 0) & valid
    size, count = valid.sum(1), kept.sum(1)
    partial = int(((count > 0) & (count < size)).sum())
    out = [f"{partial} {structure} groups partly kept"] if partial else []
    if isinstance(structure, KofN):
        per_run = (count == size).reshape(-1, structure.n).sum(1)
        wrong = per_run != structure.k
        if wrong.any():
            out.append(f"{int(wrong.sum())} runs keep {sorted(set(per_run[wrong].tolist()))} "
                       f"of {structure.n}, not {structure.k}")
    return out


def map_violations(maps: FeatureMaps, masks: Mapping[str, Tensor]) -> list[str]:
    """What in ``masks`` ({parameter: bool mask}) breaks the coupled feature maps ``maps``: a
    map kept in some members and pruned in others. A map counts as kept where any entry of
    any member is kept; every mask must then be exactly ``maps.mask`` of those flags."""
    keep = torch.zeros(len(maps.groups), dtype=torch.bool)
    for i, g in enumerate(maps.groups):
        keep[i] = any(bool(masks[m.param].cpu().select(m.axis, m.index).any())
                      for m in g.members if m.param in masks)
    out = []
    for name, mask in masks.items():
        wrong = maps.mask(name, tuple(mask.shape), keep) != mask.cpu()
        if wrong.any():
            out.append(f"{name}: {int(wrong.sum())} entries not whole maps")
    return out


def _untouched(model: nn.Module) -> tuple[dict[str, Tensor], list[tuple[str, type]]]:
    return (copy.deepcopy(model.state_dict()),
            [(n, type(m)) for n, m in model.named_modules()])


# -- the checks -----------------------------------------------------------------------------------
def check_trains_and_prunes(cls: type, config: Mapping[str, Any], model_factory: ModelFactory,
                            inputs: Tensor) -> None:
    """Construct, train: the optimizer sees every parameter once, the penalty is a finite
    scalar, the weights move, something is pruned, and ``masks()`` describe what the layers
    compute with in eval mode (zero where a mask is False)."""
    model, pruner, optimizer = _build(cls, config, model_factory, inputs)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "param_groups lists a parameter twice"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}, \
        "param_groups misses parameters of the model or of the method"
    penalty = pruner.penalty()
    assert penalty.dim() == 0 and torch.isfinite(penalty), f"penalty() gave {penalty}"
    before = {n: layer.original().detach().clone() for n, layer in pruner.layers.items()}
    train_steps(model, pruner, optimizer, inputs, STEPS)
    assert (pruner.steps, pruner.epochs) == (STEPS, STEPS // EPOCH)
    assert any(not torch.equal(before[n], l.original()) for n, l in pruner.layers.items()), \
        "training did not change any pruned weight"
    masks = pruner.masks()
    assert list(masks) == list(pruner.layers), "masks() keys are not the pruned parameters"
    assert pruner.sparsity() > 0, f"{STEPS} steps pruned nothing: the configuration is too weak"
    model.eval()
    with torch.no_grad():
        for name, mask in masks.items():
            layer = pruner.layers[name]
            assert mask.dtype == torch.bool and tuple(mask.shape) == layer.shape, name
            weight = layer.effective_weight()
            assert not weight[~mask].any(), f"{name}: nonzero weights where the mask is False"


def check_masks_obey_structure(cls: type, config: Mapping[str, Any],
                               model_factory: ModelFactory, inputs: Tensor) -> None:
    """After training (and after ``finalize()``) every mask obeys its layer's structure
    exactly: whole groups kept or removed, exactly k of every run of n."""
    model, pruner, optimizer = _build(cls, config, model_factory, inputs)
    train_steps(model, pruner, optimizer, inputs, STEPS)
    structures = {n: layer.structure for n, layer in pruner.layers.items()}
    maps = getattr(pruner, "maps", None)
    for when, masks in (("trained", pruner.masks()), ("finalized", None)):
        if masks is None:
            pruner.finalize()
            masks = pruner.masks()
        if isinstance(maps, FeatureMaps):  # a weight may hold members of two maps' families
            broken = map_violations(maps, masks)
            assert not broken, f"maps ({when}): {'; '.join(broken)}"
            continue
        for name, mask in masks.items():
            broken = structure_violations(structures[name], mask)
            assert not broken, f"{name} ({when}, {structures[name]}): {'; '.join(broken)}"


def check_finalize(cls: type, config: Mapping[str, Any], model_factory: ModelFactory,
                   inputs: Tensor) -> None:
    """``finalize()`` gives the model back as plain modules (the factory's own module types,
    state_dict keys, no parametrizations or hooks) with the pruned model's function in eval
    mode (to 1e-5 of the output scale) and the zeros of ``masks()`` baked in; the training
    verbs raise afterwards."""
    fresh = model_factory()
    model, pruner, optimizer = _build(cls, config, model_factory, inputs)
    train_steps(model, pruner, optimizer, inputs, STEPS)
    model.eval()
    with torch.no_grad():
        expected = model(inputs)
    masks = pruner.masks()
    out = pruner.finalize()
    assert out is model, "finalize() must return the model it pruned"
    assert [(n, type(m)) for n, m in model.named_modules()] == \
        [(n, type(m)) for n, m in fresh.named_modules()], "finalize() left wrapper modules"
    assert not any(parametrize.is_parametrized(m) for m in model.modules()), \
        "finalize() left parametrizations"
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for (name, m), f in zip(model.named_modules(), fresh.modules(), strict=True):
        for h in hooks:
            assert len(getattr(m, h)) == len(getattr(f, h)), f"finalize() left {h} on {name!r}"
    assert set(model.state_dict()) == set(fresh.state_dict()), "state_dict keys changed"
    with torch.no_grad():
        got = model(inputs)
    scale = float(expected.abs().max()) or 1.0
    diff = float((got - expected).abs().max())
    assert diff <= 1e-5 * scale, f"finalized output differs by {diff:.3g} (scale {scale:.3g})"
    for name, mask in masks.items():
        assert not model.get_parameter(name)[~mask].any(), f"{name}: zeros not baked in"
        assert torch.equal(pruner.masks()[name], mask), f"{name}: masks() changed at finalize"
    for verb in ("step", "epoch_end", "penalty", "state_dict"):
        try:
            getattr(pruner, verb)()
        except LifecycleError:
            continue
        raise AssertionError(f"{verb}() after finalize() did not raise LifecycleError")


def check_resume_exact(cls: type, config: Mapping[str, Any], model_factory: ModelFactory,
                       inputs: Tensor) -> None:
    """Training ``STEPS`` straight equals training half, saving model, optimizer and pruner
    state to a checkpoint, loading it into a newly built run (other seed) and training the
    other half: bitwise-equal weights, method state and masks."""
    half = STEPS // 2
    model, pruner, optimizer = _build(cls, config, model_factory, inputs)
    train_steps(model, pruner, optimizer, inputs, STEPS)
    straight, straight_masks = copy.deepcopy(model.state_dict()), pruner.masks()

    model, pruner, optimizer = _build(cls, config, model_factory, inputs)
    train_steps(model, pruner, optimizer, inputs, half)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "pruner": pruner.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, pruner, optimizer = _build(cls, config, model_factory, inputs, seed=1)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    pruner.load_state_dict(checkpoint["pruner"])
    assert pruner.steps == half, "load_state_dict did not restore the step count"
    train_steps(model, pruner, optimizer, inputs, STEPS - half)
    resumed = model.state_dict()
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), f"{key} differs after resuming"
    for name, mask in straight_masks.items():
        assert torch.equal(mask, pruner.masks()[name]), f"{name}: mask differs after resuming"


def check_rejects_bad_input(cls: type, config: Mapping[str, Any], model_factory: ModelFactory,
                            inputs: Tensor | None = None) -> None:
    """A target naming no layer, each of the method's registered ``bad_settings`` and every
    structure of ``UNSUPPORTED_CANDIDATES`` it does not list raise a ``HwpruneError`` at
    construction, and the model is left exactly as it was."""
    spec = get_method(cls)
    assert spec.bad_settings, f"{spec.name}: register at least one bad numeric setting"
    cases: list[tuple[str, dict[str, Any], type]] = [
        ("targets=['no_such_layer']", {"targets": ["no_such_layer"]}, TargetError)]
    cases += [(repr(b), dict(b), HwpruneError) for b in spec.bad_settings]
    if spec.structure_arg is not None:
        cases += [(f"{spec.structure_arg}={s!r}", {spec.structure_arg: s}, HwpruneError)
                  for s in UNSUPPORTED_CANDIDATES if s not in spec.structures]
    for label, change, error in cases:
        torch.manual_seed(0)
        model = model_factory()
        state, modules = _untouched(model)
        try:
            cls(model, **{**method_arguments(cls, config, inputs), **change})
        except error:
            pass
        else:
            raise AssertionError(f"{spec.name}({label}) did not raise {error.__name__}")
        assert [(n, type(m)) for n, m in model.named_modules()] == modules, \
            f"{spec.name}({label}) changed the model's modules before raising"
        now = model.state_dict()
        assert now.keys() == state.keys() and all(torch.equal(v, now[k])
                                                  for k, v in state.items()), \
            f"{spec.name}({label}) changed the model's state before raising"


CHECKS = (check_trains_and_prunes, check_masks_obey_structure, check_finalize,
          check_resume_exact, check_rejects_bad_input)


def check_method(cls: type, config: Mapping[str, Any], model_factory: ModelFactory,
                 inputs: Tensor) -> None:
    """Every check of ``CHECKS`` on one configuration of a registered method."""
    for check in CHECKS:
        check(cls, config, model_factory, inputs)


# -- distributed ----------------------------------------------------------------------------------
Case = tuple[str, type, Mapping[str, Any], ModelFactory, Tensor]


def check_ranks_agree(cases: Sequence[Case], world: int = 2) -> None:
    """Run every ``(label, cls, config, model_factory, inputs)`` case under
    DistributedDataParallel on ``world`` CPU processes (gloo; one spawn for all cases, since
    process start-up dominates): each rank builds its model from another seed and trains on
    its own noise, and every rank must end with rank 0's masks, method state and finalized
    parameters. ``cls`` and ``model_factory`` must be importable (module-level) objects."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_rank_worker, args=(world, port, root, list(cases)), nprocs=world, join=True)
        for i, (label, *_rest) in enumerate(cases):
            results = [torch.load(Path(root) / f"{i}-{r}.pt", weights_only=True)
                       for r in range(world)]
            for r, other in enumerate(results[1:], start=1):
                for part in ("masks", "layers", "final"):
                    a, b = results[0][part], other[part]
                    assert a.keys() == b.keys(), f"{label}: {part} keys differ on rank {r}"
                    for key in a:
                        assert torch.equal(a[key], b[key]), \
                            f"{label}: rank {r}'s {part}[{key!r}] differs from rank 0's"


def _rank_worker(rank: int, world: int, port: int, root: str, cases: list[Case]) -> None:
    import torch.distributed as dist

    from .. import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, (_label, cls, config, model_factory, inputs) in enumerate(cases):
            model, pruner, optimizer = _build(cls, config, model_factory, inputs, seed=rank)
            ddp = nn.parallel.DistributedDataParallel(model)  # wrapped after the pruner
            train_steps(ddp, pruner, optimizer, inputs + rank, STEPS)
            del ddp
            state = pruner.state_dict()
            record = {"masks": pruner.masks(),
                      "layers": {f"{n}.{k}": v for n, d in state["layers"].items()
                                 for k, v in d.items()},
                      # parameters only: BatchNorm's running statistics are each rank's own
                      "final": {n: p.detach() for n, p in
                                pruner.finalize().named_parameters()}}
            torch.save(record, Path(root) / f"{i}-{rank}.pt")
    finally:
        distributed.shutdown()
