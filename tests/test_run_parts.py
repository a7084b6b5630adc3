"""The parts a run is built from: the data-set registry, the builder and the phase plan."""

import pytest
import torch
from torch.utils.data import TensorDataset

from hwprune.app.build import build
from hwprune.app.datasets import DATASETS, DatasetSpec, dataset_spec
from hwprune.app.phases import Plan
from hwprune.app.recipe import RecipeError, resolve


def test_an_unknown_data_set_is_one_line_naming_every_registered_one():
    with pytest.raises(RecipeError) as e:
        dataset_spec("imagenet")
    message = str(e.value)
    assert "data.name" in message and "'imagenet'" in message and "\n" not in message
    for name in DATASETS:
        assert name in message


def test_a_registered_data_set_builds_and_gives_the_model_its_classes(monkeypatch):
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 3

    def load(root, data, seed):
        assert root is None  # needs_folder=False: no data folder is resolved
        return TensorDataset(x, y), TensorDataset(x[:10], y[:10]), {}

    monkeypatch.setitem(DATASETS, "toy", DatasetSpec(load, needs_folder=False))
    cfg = resolve({"model": {"name": "small_cnn", "args": {"width": 4}},
                   "data": {"name": "toy", "train_subset": 30}}, name="toy")
    parts = build(cfg)
    assert cfg["model"]["args"]["num_classes"] == 3  # filled in from the labels
    assert parts.data.train_x.shape == (30, 1, 8, 8) and parts.example.shape == (1, 1, 8, 8)
    assert parts.model(parts.example).shape == (1, 3) and parts.method_cls is None


def test_a_loader_that_returns_no_tensor_pairs_is_named(monkeypatch):
    monkeypatch.setitem(DATASETS, "lists", DatasetSpec(lambda r, d, s: ([1], [2], {}), False))
    cfg = resolve({"model": {"name": "small_cnn"}, "data": {"name": "lists"}}, name="x")
    with pytest.raises(RecipeError, match="'lists' gave a train set of list"):
        build(cfg)


def test_the_plan_maps_epochs_to_phases_and_never_makes_a_batch_of_one():
    cfg = resolve({"model": {"name": "small_cnn"},
                   "train": {"dense_epochs": 1, "prune_epochs": 2, "finetune_epochs": 1,
                             "batch_size": 4}}, name="x")
    plan = Plan(cfg, torch.arange(18.0).view(9, 2), torch.arange(9))
    assert [plan.phase_of(e) for e in range(plan.total_epochs)] == [
        "dense", "prune", "prune", "finetune"]
    assert plan.steps_per_epoch() == 2  # 9 = 4 + 4 + 1: the last row is dropped
    sizes = [len(x) for _, x, _ in plan.batches(0, 0)]
    assert sizes == [4, 4]
    again = [x for _, x, _ in plan.batches(0, 1)]  # resumed at step 1: the same batch
    assert torch.equal(again[0], list(plan.batches(0, 0))[1][1])


def _toy_schedule_cfg(monkeypatch, schedule):
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 3
    monkeypatch.setitem(DATASETS, "toy", DatasetSpec(
        lambda r, d, s: (TensorDataset(x, y), TensorDataset(x[:8], y[:8]), {}), False))
    return resolve({"model": {"name": "small_cnn", "args": {"width": 4}},
                    "data": {"name": "toy"},
                    "method": {"name": "Magnitude", "structure": "element", "sparsity": 0.5,
                               "schedule": schedule},
                    "train": {"prune_epochs": 2, "finetune_epochs": 1, "batch_size": 8}},
                   name="toy")


@pytest.mark.parametrize("schedule, late", [
    ({"type": "cubic", "begin": 0, "end": 10, "every": 2}, False),  # 2 epochs x 5 steps
    ({"type": "cubic", "begin": 0, "end": 11, "every": 2}, True),
    ({"type": "linear", "begin": 0, "end": 2, "unit": "epoch"}, False),
    ({"type": "linear", "begin": 1, "end": 3, "unit": "epoch"}, True),
])
def test_a_schedule_that_ends_after_the_pruning_phase_is_named_before_training(
        monkeypatch, schedule, late):
    import warnings

    from hwprune.app.build import ScheduleWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(_toy_schedule_cfg(monkeypatch, schedule))
    found = [w for w in caught if issubclass(w.category, ScheduleWarning)]
    assert len(found) == int(late)
    if late:
        message = str(found[0].message)
        limit = "10" if schedule.get("unit", "step") == "step" else "2"
        assert f"ends at {schedule.get('unit', 'step')} {schedule['end']}" in message
        assert f"method.schedule.end at most {limit}" in message


@pytest.mark.parametrize("logit_init, pretrained, warned", [
    ("zeros", True, True), ("random", True, True), ("magnitude", True, False),
    ("zeros", False, False)])
def test_a_blind_dpp_start_on_a_pretrained_model_is_named_before_training(
        monkeypatch, tmp_path, logit_init, pretrained, warned):
    import warnings

    from hwprune.app.build import StartWarning

    cfg = _toy_schedule_cfg(monkeypatch, {"type": "cubic", "begin": 0, "end": 10, "every": 2})
    cfg["method"] = {"name": "DPP", "structure": "1:4", "logit_init": logit_init}
    if pretrained:  # the toy model's own initial weights as its checkpoint
        torch.save(build(resolve(cfg, name="toy")).model.state_dict(), tmp_path / "w.pt")
        cfg["model"]["pretrained"] = str(tmp_path / "w.pt")
    cfg = resolve(cfg, name="toy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(cfg)
    found = [str(w.message) for w in caught if issubclass(w.category, StartWarning)]
    assert len(found) == int(warned)
    if warned:
        assert f"method.logit_init is {logit_init!r}" in found[0]
        assert "method.logit_init: magnitude" in found[0]
