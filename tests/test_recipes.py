"""The shipped recipes: each resolves, its model and method build (paper-sized ones included, no
data needed), the CPU-sized digits ones run a few steps end to end; the schema's rules."""

import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import hwprune as hp
from hwprune import models
from hwprune.app.recipe import (
    RecipeError,
    find_recipe,
    load_recipe,
    method_class,
    method_kwargs,
    resolve,
    shipped_recipes,
)
from hwprune.app.runner import Run

DATA = Path(os.environ.get("HWPRUNE_DATA_DIR", "/work/shared/data"))
PAPERS = ("psp", "dpp", "admm", "darb")


def _raw(name):
    return yaml.safe_load(find_recipe(name)[0])


def _skip_if_missing(raw):
    """Recipes may name methods and models that land later: skip only those."""
    if raw.get("method") and not hasattr(hp, raw["method"]["name"]):
        pytest.skip(f"hwprune has no {raw['method']['name']} yet")
    if ":" not in raw["model"]["name"] and raw["model"]["name"] not in models.MODELS:
        pytest.skip(f"the zoo has no {raw['model']['name']} yet")


def test_every_paper_has_a_cpu_and_a_paper_sized_recipe():
    names = shipped_recipes()
    for paper in PAPERS:
        mine = [n for n in names if n.startswith(paper + "-")]
        cpu = [n for n in mine if n.endswith("-cpu") or n.endswith("-digits")]
        assert cpu and set(mine) - set(cpu), (paper, mine)
    for name in names:  # every recipe says what it is
        assert find_recipe(name)[0].startswith("#"), name


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipe_resolves_and_its_model_and_method_build(name):
    raw = _raw(name)
    _skip_if_missing(raw)
    cfg = load_recipe(name)
    assert cfg["name"] == name
    assert sum(cfg["train"][f"{p}_epochs"] for p in ("dense", "prune", "finetune")) >= 1
    args = dict(cfg["model"]["args"])
    if cfg["model"]["name"] == "char_lstm":
        args.setdefault("vocab_size", 65)  # what the text data supplies at run time
    model = models.MODELS[cfg["model"]["name"]](**args)
    kwargs = method_kwargs(cfg["method"])
    # parameter names were checked against the signature by load_recipe; building the pruner
    # also checks their values (VGG-16 and the 2 x 1500 LSTM are too slow for a unit test)
    if sum(p.numel() for p in model.parameters()) <= 12_000_000:
        pruner = method_class(cfg["method"]["name"])(model, **kwargs)
        assert pruner.layers, name  # it prunes something
    if cfg["model"]["pretrained"]:
        assert (DATA / cfg["model"]["pretrained"]).is_file() or not DATA.is_dir()


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n.endswith("-digits")])
def test_cpu_digits_recipes_run_a_few_steps(tmp_path, name):
    raw = _raw(name)
    _skip_if_missing(raw)
    torch.set_num_threads(1)
    short = [f"train.{p}_epochs={min(1, raw.get('train', {}).get(f'{p}_epochs', 0))}"
             for p in ("dense", "prune", "finetune")]
    if name.startswith("dpp"):
        short[1] = "train.prune_epochs=2"
    cfg = load_recipe(name, short + ["train.steps_per_epoch=3", "end.latency=false",
                                     "end.plots=false"])
    from rich.console import Console

    summary = Run(cfg, console=Console(file=open(os.devnull, "w"))).execute(  # noqa: SIM115
        tmp_path / "out")
    assert 0.0 <= summary["accuracy"] <= 1.0
    if not name.startswith("psp"):  # PSP's decay needs more than 3 steps to cut a channel
        assert summary["sparsity"] > 0.0 and summary["kept_params"] < summary["params"]


def test_text_data_hook_builds_next_character_windows(tmp_path):
    if not hasattr(__import__("hwprune.data").data, "load_tinyshakespeare"):
        pytest.skip("no text loader in hwprune.data yet")
    if not (DATA / "text" / "tinyshakespeare.txt").is_file():
        pytest.skip("no Tiny Shakespeare in the data folder")
    raw = _raw("darb-lstm-shakespeare-cpu")
    _skip_if_missing(raw)
    cfg = load_recipe("darb-lstm-shakespeare-cpu", [f"data.dir={DATA}"])
    run = Run(cfg)
    assert run.train_x.shape == (2000, 64) and run.test_x.shape == (200, 64)
    # targets are the inputs shifted by one character
    assert torch.equal(run.train_x[:, 1:], run.train_y[:, :-1])
    assert run.cfg["model"]["args"]["vocab_size"] == int(run.train_y.max()) + 1 or \
        run.cfg["model"]["args"]["vocab_size"] > int(run.train_y.max())


# -- the schema ----------------------------------------------------------------------------------


def test_defaults_fill_every_section():
    cfg = resolve({"model": {"name": "small_cnn"}}, name="x")
    assert cfg["name"] == "x" and cfg["method"] is None and cfg["data"]["name"] == "digits"
    assert cfg["optimizer"]["lr"] == 0.05 and cfg["train"]["phase_hook"] == "hard_project"
    assert list(cfg) == ["name", "seed", "model", "data", "method", "optimizer", "train", "end"]


@pytest.mark.parametrize("raw, match", [
    ({}, r"model.name: missing"),
    ({"model": {"name": "x"}, "train": {"prune_epochs": 0}}, r"epochs in all"),
    ({"model": {"name": "x"}, "method": {"structure": "channel"}}, r"method.name: missing"),
    ({"model": {"name": "x"}, "method": {"name": "Magnitude", "sparsity": 0.5,
                                         "schedule": {"type": "quadratic"}}},
     r"method.schedule.type: got 'quadratic'; allowed: one_shot"),
    ({"model": {"name": "x"}, "end": {"finalize": False}}, r"end.finalize"),
    ({"model": {"name": "x"}, "train": {"batch_size": True}}, r"train.batch_size: got True"),
    ({"model": "small_cnn"}, r"model: got 'small_cnn' \(str\); allowed: a mapping"),
    ({"model": {"name": "x"}, "optimizer": {"milestones": [0]}}, r"optimizer.milestones"),
])
def test_schema_errors_name_the_field_and_what_is_allowed(raw, match):
    with pytest.raises(RecipeError, match=match) as e:
        cfg = resolve(raw)
        method_kwargs(cfg["method"])
    assert "\n" not in str(e.value)


def test_schedules_and_lists_become_objects_and_tuples():
    cfg = resolve({"model": {"name": "x"}, "method": {
        "name": "magnitude", "sparsity": 0.5, "targets": ["fc1"],
        "schedule": {"type": "cubic", "begin": 0, "end": 10, "every": 2}}})
    kw = method_kwargs(cfg["method"])
    assert cfg["method"]["name"] == "Magnitude"  # case-insensitive, stored canonically
    assert isinstance(kw["schedule"], hp.schedules.Cubic) and kw["schedule"].end == 10
    assert kw["targets"] == ["fc1"]  # names stay a list (a tuple would mean module types)
    dpp = method_kwargs(resolve({"model": {"name": "x"}, "method": {
        "name": "DPP", "temperature": [5, 0.5]}})["method"])
    assert dpp["temperature"] == (5, 0.5)


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False))
def test_set_parses_numbers_like_the_recipe_file(lr):
    # every float --set writes (repr, with or without exponent) is read back exactly
    from hwprune.app.recipe import apply_overrides

    raw = {"model": {"name": "small_cnn"}}
    for text in (repr(lr), f"{lr:e}"):
        if lr > 0:
            cfg = resolve(apply_overrides(raw, [f"optimizer.lr={text}"]))
            assert cfg["optimizer"]["lr"] == float(text)
        else:
            with pytest.raises(RecipeError, match="optimizer.lr.*a number > 0"):
                resolve(apply_overrides(raw, [f"optimizer.lr={text}"]))
