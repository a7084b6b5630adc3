"""Fuzzing recipes and command lines (issue 17): whatever a recipe file or an argument list
holds, the outcome is success or a ``HwpruneError`` (in process), and for the command, exit 0 or
exit 2 with exactly one line on stderr, never a traceback.

Recipes are random YAML mappings built from the schema's own field names (so the checks below
the top level are reached) with random values of random types at random depths; argument lists
mix the subcommands' flags with paths to real and damaged files.
"""

import contextlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hwprune as hp
from hwprune.app.cli import main
from hwprune.app.recipe import SCHEMA, apply_overrides, load_recipe, method_kwargs, resolve
from hwprune.errors import HwpruneError
from hwprune.methods import all_methods

SRC = Path(hp.__file__).resolve().parent.parent


def _field_names(spec, prefix=""):
    for key, field in spec.items():
        yield f"{prefix}{key}"
        if isinstance(field, dict):
            yield from _field_names(field, f"{prefix}{key}.")


DOTTED = sorted(set(_field_names(SCHEMA)) | {"method", "method.name", "method.structure",
                                              "method.sparsity", "method.schedule"})
NAMES = sorted({d.rsplit(".", 1)[-1] for d in DOTTED} | {"type", "targets"})
WORDS = ["digits", "small_cnn", "sgd", "cosine", "channel", "element", "null", "2:4",
         *(spec.name for spec in all_methods())]

leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**80), 2**80),
                 st.floats(), st.text(max_size=12), st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=6))
values = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@st.composite
def recipes(draw):
    """A mapping over the schema's sections; each section a mapping over its fields (or,
    sometimes, anything at all)."""
    out = {}
    for section in draw(st.lists(st.sampled_from([*SCHEMA, "method"]), max_size=8,
                                 unique=True)):
        fields = [d.split(".", 1)[1] for d in DOTTED if d.startswith(f"{section}.")]
        if fields and draw(st.booleans()):
            out[section] = draw(st.dictionaries(st.sampled_from(fields) | keys, values,
                                                max_size=5))
        else:
            out[section] = draw(values)
    return out


overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED) | keys,
                               st.one_of(leaf.map(lambda v: yaml.safe_dump(v).strip()),
                                         st.text(max_size=8))), max_size=3)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(raw=recipes(), sets=overrides)
def test_a_random_recipe_resolves_or_is_a_hwprune_error(raw, sets):
    try:
        cfg = resolve(apply_overrides(raw, sets), name="fuzz")
        if cfg["method"] is not None:
            method_kwargs(cfg["method"])
    except HwpruneError:
        return
    assert isinstance(cfg, dict) and cfg["name"]


@settings(FUZZ, max_examples=60)
@given(raw=st.one_of(recipes(), values), data=st.binary(max_size=64), binary=st.booleans(),
       sets=overrides)
def test_a_random_recipe_file_loads_or_is_a_hwprune_error(tmp_path, raw, data, binary, sets):
    path = tmp_path / "fuzz.yaml"
    if binary:
        path.write_bytes(data)
    else:
        path.write_text(yaml.safe_dump(raw))
    try:
        load_recipe(str(path), sets)
    except HwpruneError:
        pass


# -- argument lists -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Real and damaged inputs the argument lists name, relative to the returned folder."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    hp.save(nn.Sequential(nn.Linear(4, 4)), root / "model.hwp")
    (root / "damaged.hwp").write_bytes((root / "model.hwp").read_bytes()[:40])
    (root / "binary").write_bytes(bytes(range(256)))
    (root / "recipe.yaml").write_text("model: {name: small_cnn}\ntrain: {prune_epochs: 1}\n")
    (root / "folder").mkdir()
    (root / "run").mkdir()
    (root / "run" / "summary.json").write_text('{"name": "r", "accuracy": 0.5}')
    (root / "bad-run").mkdir()
    (root / "bad-run" / "summary.json").write_text('{"name": [1], "accuracy": "x"}')
    return root


PATHS = ["model.hwp", "damaged.hwp", "binary", "recipe.yaml", "folder", "run", "bad-run",
         "missing", "binary/below", "/proc/hwprune-fuzz", "folder/new.out"]
RECIPES = ["recipe.yaml", "binary", "missing", "folder", "magnitude-digits", "no-such-recipe"]
FLAGS = {
    "run": {"--set": DOTTED, "--out": PATHS, "--resume": None, "--force": None, "--list": None},
    "compare": {"--markdown": PATHS, "--plot": PATHS},
    "report": {"--plots": PATHS, "--json": PATHS, "--markdown": PATHS,
               "--model": ["small_cnn", "resnet20", "bogus"],
               "--input-shape": ["3,8,8", "0", "a,b", "-1"]},
    "shrink": {"--out": PATHS, "--fold-batchnorm": None,
               "--model": ["small_cnn", "resnet20", "bogus"],
               "--input-shape": ["3,8,8", "0", "a,b", "-1"]},
    "export": {"--out": [*PATHS, "m.pt2", "m.onnx", "m.bin"], "--no-shrink": None,
               "--format": ["torch.export", "torchscript", "onnx", "tflite"],
               "--static-batch": None, "--model": ["small_cnn", "resnet20", "bogus"],
               "--input-shape": ["3,8,8", "0", "a,b", "-1"]},
}


def argument_list(pick) -> list[str]:
    """One command line; ``pick(options)`` chooses (hypothesis or a seeded random)."""
    command = pick(["run", "compare", "report", "shrink", "export", "bogus"])
    args = [command]
    if command == "run":
        args += [pick(RECIPES), "--dry-run"]  # --dry-run: validated and built, never trained
    elif command == "compare":
        args += [pick(PATHS) for _ in range(pick([0, 1, 2]))]
    elif command in ("report", "shrink", "export"):
        args += [pick(PATHS)]
    for _ in range(pick([0, 1, 2, 3])):
        flags = FLAGS.get(command, {"--help": None})
        flag = pick(sorted(flags))
        args.append(flag)
        if flags[flag] is not None:
            value = pick(flags[flag])
            args.append(f"{value}={pick(['0', '1e400', 'abc', '[1]', '{a: 1}', ''])}"
                        if flag == "--set" else value)
    if pick([False, False, False, True]):
        args.insert(pick(range(len(args) + 1)), pick(["--", "-x", "--out", "é", ""]))
    return args


def assert_clean(code, out, err):
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_random_command_lines_succeed_or_fail_in_one_line(paths, data, monkeypatch):
    args = argument_list(lambda options: data.draw(st.sampled_from(list(options))))
    monkeypatch.chdir(paths)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: --help (0) or bad arguments (2)
            code = e.code
    assert_clean(code, out.getvalue(), err.getvalue())


def test_random_command_lines_through_the_installed_command(paths):
    """A handful of the same kind of command lines through ``python -m hwprune``."""
    rng = random.Random(17)
    lines = [argument_list(lambda options: rng.choice(list(options))) for _ in range(4)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "hwprune", *args], cwd=paths, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in lines]
    for args, proc in zip(lines, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert_clean(proc.returncode, out, f"{args}: {err}" if proc.returncode else err)
