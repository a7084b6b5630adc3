"""hwprune.integrations.lightning.PruningCallback: every method under a Lightning Trainer equals
the plain API, resumes exactly from Lightning's checkpoint, applies the penalty, and refuses
misuse with one HwpruneError."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hwprune as hp
from hwprune.errors import HwpruneError
from hwprune.integrations import Finish
from hwprune.integrations.lightning import PruningCallback
from integration_cases import (
    BATCH,
    EPOCHS,
    LR,
    PENALTY_ONLY,
    SEED,
    assert_penalty_alone_moved_alphas,
    assert_same_result,
    case_id,
    make_mlp,
    method_cases,
    plain_fit,
    task,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations-lightning.md"


class Classifier(pl.LightningModule):
    """The user's module: the task loss only, an optimizer over all its parameters."""

    def __init__(self, model: nn.Module | None = None, lr: float = LR):
        super().__init__()
        torch.manual_seed(SEED)
        self.model = model if model is not None else make_mlp()
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(*task()), batch_size=BATCH, shuffle=False)


def trainer(tmp_path: Path, epochs: int = EPOCHS, **kwargs) -> pl.Trainer:
    settings = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**settings, **kwargs})


def fit(tmp_path: Path, callback: PruningCallback, epochs: int = EPOCHS,
        module: pl.LightningModule | None = None, ckpt_path: str | None = None, **kwargs):
    module = module if module is not None else Classifier()
    t = trainer(tmp_path, epochs, **{"callbacks": [callback], **kwargs})
    t.fit(module, loader(), ckpt_path=ckpt_path)
    return module, t


@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_every_method_equals_the_plain_api(case, tmp_path):
    cls, kwargs = case
    ref_model, ref_pruner = plain_fit(cls, kwargs)
    callback = PruningCallback(cls, module="model", finish=Finish(finalize=True),
                               **copy.deepcopy(kwargs))
    module, t = fit(tmp_path, callback)
    assert_same_result(module.model, callback.pruner, ref_model, ref_pruner)
    assert callback.finished.model is module.model
    logged = t.callback_metrics
    assert float(logged["hwprune/sparsity"]) == pytest.approx(ref_pruner.sparsity())
    assert float(logged["hwprune/epochs"]) == EPOCHS


def test_fix_pattern_at_fixes_the_pattern_for_the_epochs_left(tmp_path):
    kwargs = {"structure": "2:4", "noise_scale": 1.0, "logit_lr": 5.0}
    ref_model, ref_pruner = plain_fit(hp.DPP, kwargs, fix_after=1)
    callback = PruningCallback(hp.DPP, module="model", finish=Finish(finalize=True),
                               fix_pattern_at=1, **copy.deepcopy(kwargs))
    module, _ = fit(tmp_path, callback)
    assert_same_result(module.model, callback.pruner, ref_model, ref_pruner)
    learning = plain_fit(hp.DPP, kwargs)[1]  # without the fix the pattern went on moving
    assert any(not torch.equal(learning.masks()[n], ref_pruner.masks()[n])
               for n in ref_pruner.masks())
    with pytest.raises(HwpruneError, match="fix_pattern_at: got 0"):
        PruningCallback(hp.DPP, fix_pattern_at=0, structure="2:4")


def test_resumed_from_a_lightning_checkpoint_equals_an_uninterrupted_fit(tmp_path):
    kwargs = {"structure": "2:4", "anneal_epochs": 2, "logit_lr": 5.0, "entropy_weight": 0.01}
    straight = PruningCallback(hp.DPP, module="model", **kwargs)
    model_a, _ = fit(tmp_path / "a", straight)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1,
                                         every_n_epochs=1)
    first = PruningCallback(hp.DPP, module="model", **kwargs)
    fit(tmp_path / "b", first, epochs=1, enable_checkpointing=True, callbacks=[first, saver])
    [ckpt] = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = PruningCallback(hp.DPP, module="model", **kwargs)
    model_b, _ = fit(tmp_path / "c", resumed, ckpt_path=str(ckpt))
    assert resumed.pruner.state_dict()["steps"] == straight.pruner.state_dict()["steps"]
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    for name, mask in straight.pruner.masks().items():
        assert torch.equal(mask, resumed.pruner.masks()[name])
    assert torch.equal(straight.pruner.generator.get_state(), resumed.pruner.generator.get_state())


class PenaltyOnly(Classifier):
    """A task loss that is exactly zero: only the method's penalty moves anything."""

    def training_step(self, batch, batch_idx):
        return 0.0 * self.model(batch[0]).sum()


def test_the_penalty_acts_a_known_answer(tmp_path):
    callback = PruningCallback(hp.PSP, module="model", **PENALTY_ONLY)
    fit(tmp_path, callback, module=PenaltyOnly())
    assert_penalty_alone_moved_alphas(callback.pruner)


def test_a_model_with_nothing_to_prune_is_one_error(tmp_path):
    class Tiny(Classifier):  # only the output layer, which the default targets leave dense
        def __init__(self):
            super().__init__(nn.Sequential(nn.Linear(16, 4)))

    with pytest.raises(HwpruneError, match="selects no weight"):
        fit(tmp_path, PruningCallback(hp.DPP, module="model", structure="2:4"), module=Tiny())


def test_an_optimizer_without_the_methods_groups_is_one_error(tmp_path):
    # add_param_groups=False: configure_optimizers must use pruner.param_groups; this one
    # holds PSP's alphas with the model's weight decay instead of the method's
    callback = PruningCallback(hp.PSP, module="model", structure="channel",
                               add_param_groups=False, alpha_decay=0.2)
    with pytest.raises(HwpruneError, match=re.escape("PSP's parameters")):
        fit(tmp_path, callback)


def test_a_method_block_and_a_name_build_the_same_pruner(tmp_path):
    block = PruningCallback({"name": "dpp", "structure": "2:4", "temperature": [5, 0.5]},
                            module="model")
    named = PruningCallback("DPP", module="model", structure="2:4", temperature=(5, 0.5))
    assert block.choice.cls is named.choice.cls is hp.DPP
    assert block.choice.kwargs == named.choice.kwargs == {"structure": "2:4",
                                                          "temperature": (5, 0.5)}
    with pytest.raises(HwpruneError, match="method.nonsense"):
        PruningCallback({"name": "DPP", "nonsense": 1})


class RecordRank(pl.Callback):
    """Writes what one rank ended with (DDP workers' callbacks are copies)."""

    def __init__(self, pruning: PruningCallback, folder: Path):
        self.pruning, self.folder = pruning, folder

    def on_fit_end(self, trainer, pl_module):
        torch.save({"masks": self.pruning.pruner.masks(),
                    "weights": self.pruning.finished.model.state_dict()},
                   self.folder / f"rank{trainer.global_rank}.pt")


def test_two_ddp_ranks_end_identical(tmp_path):
    # two CPU processes (gloo): each rank trains on its half of every batch; the pruner is
    # built on the bare module in setup, DDP averages the method's gradients, and the ranks
    # end with the same masks and the same finalized weights
    callback = PruningCallback(hp.DPP, module="model", structure="2:4", logit_lr=5.0,
                               anneal_epochs=2, finish=Finish(finalize=True))
    fit(tmp_path, callback, strategy="ddp_spawn", devices=2,
        callbacks=[callback, RecordRank(callback, tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for part in ("masks", "weights"):
        assert list(ranks[0][part]) == list(ranks[1][part])
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), (part, key)
    assert sum(int((~m).sum()) for m in ranks[0]["masks"].values()) > 0


def test_gradient_accumulation_adds_the_penalty_once_per_optimizer_step(tmp_path):
    kwargs = {"block": (1, 4), "unify": 0.25, "zero": 0.25, "rho": 0.05, "admm_interval": 1}
    ref_model, ref_pruner = plain_fit(hp.ADMM, kwargs, accumulate=2)
    callback = PruningCallback(hp.ADMM, module="model", finish=Finish(finalize=True), **kwargs)
    module, _ = fit(tmp_path, callback, accumulate_grad_batches=2)
    assert callback.pruner.steps == EPOCHS * 2
    assert_same_result(module.model, callback.pruner, ref_model, ref_pruner)


class Scheduled(Classifier):
    """A per-step warm-up (a quarter of the LR at first, the whole after 4 steps), then a
    halving per epoch."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 0.25, total_iters=4)
        halve = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
        return [optimizer], [{"scheduler": warmup, "interval": "step"}, halve]


class RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_schedulers_built_with_the_optimizer_schedule_the_methods_groups(tmp_path):
    callback = PruningCallback(hp.DPP, module="model", structure="2:4", logit_lr=5.0)
    lrs = RecordLR()
    _, t = fit(tmp_path, callback, module=Scheduled(), callbacks=[callback, lrs])
    # the logits' group follows the warm-up and the halving from its own base, 5.0
    for model_lr, logits_lr in lrs.lrs:
        assert logits_lr == pytest.approx(model_lr * 5.0 / LR)
    assert lrs.lrs[0][1] == pytest.approx(5.0 * 0.25)
    model_group, logits = t.optimizers[0].param_groups
    assert logits["lr"] == pytest.approx(5.0 * 0.5 ** EPOCHS)
    assert logits["params"] == [layer.parametrization.logits
                                for layer in callback.pruner.layers.values()]


def test_finish_shrinks_reports_and_saves(tmp_path):
    x, _ = task()
    finish = Finish(finalize=True, shrink=True, report=True, save=tmp_path / "m.hwp",
                    example_inputs=x[:1])
    callback = PruningCallback(hp.Magnitude, module="model", structure="channel",
                               sparsity=0.5, finish=finish)
    module, _ = fit(tmp_path, callback)
    small = callback.finished.model
    assert small.state_dict()["2.weight"].shape == (32, 16)  # half the hidden inputs remain
    assert torch.allclose(small(x), module.model(x), atol=1e-5)
    assert callback.finished.report.to_markdown()
    assert set(hp.load(tmp_path / "m.hwp")) == set(module.model.state_dict())


def test_finish_refuses_what_needs_finalize_or_inputs():
    with pytest.raises(HwpruneError, match="finalize=True"):
        Finish(save="m.hwp")
    with pytest.raises(HwpruneError, match="example_inputs"):
        Finish(finalize=True, shrink=True)


class OneCycle(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=8)]


def test_a_scheduler_that_cannot_learn_the_new_groups_is_one_error(tmp_path):
    callback = PruningCallback(hp.DPP, module="model", structure="2:4", logit_lr=5.0)
    with pytest.raises(HwpruneError, match="OneCycleLR keeps .*max_lr"):
        fit(tmp_path, callback, module=OneCycle())
