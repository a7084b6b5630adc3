"""The shipped recipes: each resolves, its model and method build (paper-sized ones included, no
data needed), the CPU-sized digits ones run a few steps end to end; every registered method has
a recipe and a docs page in docs/README.md; a checkpoint in the public layout the recipes name
loads exactly into their models; the schema's rules."""

import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import hwprune as hp
from hwprune import models
from hwprune.app.build import load_pretrained
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
from hwprune.methods import all_methods, get_method

PAPERS = ("psp", "dpp", "admm", "darb")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _raw(name):
    return yaml.safe_load(find_recipe(name)[0])


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
    cfg = load_recipe(name)
    assert cfg["name"] == name
    assert sum(cfg["train"][f"{p}_epochs"] for p in ("dense", "prune", "finetune")) >= 1
    # a method the recipe names but the registry lacks (a rename) fails here
    assert get_method(raw["method"]["name"]).cls is method_class(cfg["method"]["name"])
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


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_every_registered_method_has_a_recipe_and_a_docs_page_in_the_index(spec):
    assert spec.recipe in shipped_recipes(), (spec.name, spec.recipe)
    assert load_recipe(spec.recipe)["method"]["name"] == spec.name
    assert spec.doc is not None and (DOCS / spec.doc).is_file(), (spec.name, spec.doc)
    assert f"]({spec.doc})" in (DOCS / "README.md").read_text(), \
        f"docs/README.md does not link {spec.doc}"


def test_the_docs_index_links_every_page_and_only_pages_that_exist():
    index = (DOCS / "README.md").read_text()
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert linked == pages, (sorted(pages - linked), sorted(linked - pages))


@pytest.mark.parametrize("name", [n for n in shipped_recipes()
                                  if load_recipe(n)["model"]["pretrained"]])
def test_a_checkpoint_in_the_public_layout_loads_exactly_into_the_recipes_model(tmp_path, name):
    # The public CIFAR ResNet checkpoints: {"state_dict": {"module.<key>": tensor}}, saved by an
    # older PyTorch without BatchNorm's step counters. Written here at the recipe's own relative
    # path, so the test needs no data folder; bench/pretrained/eval_pretrained.py checks the
    # real files' accuracies.
    cfg = load_recipe(name, [f"data.dir={tmp_path}"])
    torch.manual_seed(1)
    source = models.MODELS[cfg["model"]["name"]](**cfg["model"]["args"])
    state = {f"module.{k}": v for k, v in source.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / cfg["model"]["pretrained"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    model = models.MODELS[cfg["model"]["name"]](**cfg["model"]["args"])
    load_pretrained(model, cfg)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), (name, key)


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n.endswith("-digits")])
def test_cpu_digits_recipes_run_a_few_steps(tmp_path, name):
    raw = _raw(name)
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
    # a fake Tiny Shakespeare (enough characters for the recipe's 2000 + 200 windows of 64)
    alphabet = "abcdefghij klmnop\n"
    ids = torch.randint(len(alphabet), (150_000,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "tinyshakespeare.txt").write_text(
        "".join(alphabet[i] for i in ids.tolist()), encoding="utf-8")
    cfg = load_recipe("darb-lstm-shakespeare-cpu", [f"data.dir={tmp_path}"])
    run = Run(cfg)
    assert run.train_x.shape == (2000, 64) and run.test_x.shape == (200, 64)
    # targets are the inputs shifted by one character
    assert torch.equal(run.train_x[:, 1:], run.train_y[:, :-1])
    # the model's vocabulary is the text's: every character of the file, no more
    assert run.cfg["model"]["args"]["vocab_size"] == len(alphabet)
    assert int(run.train_y.max()) < len(alphabet)


# -- the schema ----------------------------------------------------------------------------------


def test_defaults_fill_every_section():
    cfg = resolve({"model": {"name": "small_cnn"}}, name="x")
    assert cfg["name"] == "x" and cfg["method"] is None and cfg["data"]["name"] == "digits"
    assert cfg["optimizer"]["lr"] == 0.05 and cfg["train"]["phase_hook"] == "fix_pattern"
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
