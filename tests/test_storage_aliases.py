"""hwprune.storage: tied tensors (the same view of the same memory under two names) are
stored once and load tied; other views of shared memory are stored as they are; an alias
record that does not name an earlier stored tensor of its dtype and shape is refused."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hwprune as hp
from hwprune.report import report_state_dict
from hwprune.storage import StorageError, container, load, packing, plan, save
from hwprune.storage.aliases import ALIAS, alias_of, find_aliases
from hwprune.storage.encodings import encode


class TiedLM(nn.Module):
    """An embedding whose weight the output layer shares, as GPT-2's does."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, 16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, 300, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.embed(x))))


def test_a_tied_weight_is_stored_once_and_loads_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    save(model, tmp_path / "tied.hwp")
    untied = copy.deepcopy(model)
    untied.out.weight = nn.Parameter(untied.embed.weight.detach().clone())
    save(untied, tmp_path / "untied.hwp")
    second_copy = plan(untied).encoded["out.weight"].total_bytes
    tied_size = (tmp_path / "tied.hwp").stat().st_size
    assert tied_size < (tmp_path / "untied.hwp").stat().st_size - 0.95 * second_copy
    back = load(tmp_path / "tied.hwp")
    assert list(back) == list(model.state_dict())
    assert back["out.weight"] is back["embed.weight"]
    assert torch.equal(back["embed.weight"], model.embed.weight)
    fresh = TiedLM()
    fresh.load_state_dict(back)
    assert fresh.out.weight is fresh.embed.weight
    assert torch.equal(fresh.out.weight, model.out.weight)
    # the untied copy loads untied
    back = load(tmp_path / "untied.hwp")
    assert back["out.weight"] is not back["embed.weight"]


def test_plan_and_report_count_an_alias_as_no_bytes():
    torch.manual_seed(0)
    model = TiedLM()
    file = plan(model)
    assert file.encoded["out.weight"].encoding == ALIAS
    assert file.encoded["out.weight"].total_bytes == 0
    assert file.encoded["out.weight"].meta == {"of": "embed.weight"}
    embed_bytes = file.encoded["embed.weight"].total_bytes
    # a row tied to a tensor that is no row is charged that tensor's bytes (stored there) ...
    rep = hp.report(model, torch.randint(0, 300, (1, 5)))
    assert [r.name for r in rep.rows] == ["hidden.weight", "out.weight"]
    assert rep.rows[1].stored_bytes == embed_bytes and rep.rows[1].encoding != ALIAS
    assert rep.total["file_bytes"] == file.size
    # ... and where both are rows, the second is an alias of no bytes: nothing counted twice
    rows = {r.name: r for r in report_state_dict(model.state_dict()).rows}
    assert rows["embed.weight"].stored_bytes == embed_bytes
    assert rows["out.weight"].stored_bytes == 0 and rows["out.weight"].encoding == ALIAS


def test_other_views_of_shared_memory_are_stored_as_they_are(tmp_path):
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    state = {"base": base, "same": base, "rows": base[1:], "transposed": base.t(),
             "reshaped": base.view(8, 6), "copy": base.clone(), "again": base}
    assert find_aliases(state) == {"same": "base", "again": "base"}
    save(state, tmp_path / "views.hwp")
    back = load(tmp_path / "views.hwp")
    assert list(back) == list(state)
    for name, t in state.items():
        assert torch.equal(back[name], t)
    assert back["same"] is back["base"] and back["again"] is back["base"]
    assert all(back[n] is not back["base"] for n in ("rows", "transposed", "reshaped", "copy"))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), picks=st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_any_mix_of_tied_and_separate_tensors_round_trips(tmp_path_factory, seed, picks):
    gen = torch.Generator().manual_seed(seed)
    pool = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen),
            torch.zeros(3, 3), torch.randn(5, 4, generator=gen)]
    state = {f"t{i}": pool[p] for i, p in enumerate(picks)}
    path = tmp_path_factory.mktemp("mix") / "m.hwp"
    save(state, path)
    back = load(path)
    assert list(back) == list(state)
    for a in state:
        assert torch.equal(back[a], state[a])
        for b in state:  # tied exactly where the saved entries were one tensor
            assert (back[a] is back[b]) == (state[a] is state[b])


def _file(tmp_path, records, arrays, version=container.VERSION):
    path = tmp_path / f"forged{version}.hwp"
    path.write_bytes(container.pack(records, arrays, version))
    return path


def _records(alias_meta=None, alias_name="b", alias_shape=(4, 3), alias_dtype=torch.float32,
             order="stored first"):
    arrays = {}
    stored = packing.tensor_record("a", encode(torch.ones(4, 3), "dense"), arrays)
    alias = packing.tensor_record(alias_name, alias_of(torch.ones(alias_shape,
                                                                  dtype=alias_dtype), "a"),
                                  arrays)
    if alias_meta is not None:
        alias["meta"] = alias_meta
    return ([stored, alias] if order == "stored first" else [alias, stored]), arrays


@pytest.mark.parametrize(("change", "message"), [
    (dict(order="alias first"), "not a tensor stored before it"),
    (dict(alias_meta={"of": "missing"}), "not a tensor stored before it"),
    (dict(alias_meta={"of": "a", "x": 1}), "holds meta"),
    (dict(alias_meta={"of": 5}), "holds meta"),
    (dict(alias_shape=(3, 4)), "with dtype and shape"),
    (dict(alias_dtype=torch.float16), "with dtype and shape"),
], ids=["alias first", "missing", "extra meta", "not a name", "other shape", "other dtype"])
def test_an_alias_that_does_not_name_an_earlier_tensor_like_it_is_refused(tmp_path, change,
                                                                          message):
    records, arrays = _records(**change)
    with pytest.raises(StorageError, match=message):
        load(_file(tmp_path, records, arrays))


def test_an_alias_of_an_alias_or_with_arrays_or_in_an_older_version_is_refused(tmp_path):
    records, arrays = _records()
    chained = packing.tensor_record("c", alias_of(torch.ones(4, 3), "b"), arrays)
    with pytest.raises(StorageError, match="not a tensor stored before it"):
        load(_file(tmp_path, records + [chained], arrays))
    records, arrays = _records()
    records[1]["payload"] = ["values"]
    arrays["b/values"] = arrays["a/values"].copy()
    with pytest.raises(StorageError, match="no arrays"):
        load(_file(tmp_path, records, arrays))
    records, arrays = _records()
    with pytest.raises(StorageError, match="alias record in a version 5 file"):
        load(_file(tmp_path, records, arrays, version=5))
    records, arrays = _records()  # the same records in the current version load, tied
    back = load(_file(tmp_path, records, arrays))
    assert back["b"] is back["a"] and torch.equal(back["a"], torch.ones(4, 3))
