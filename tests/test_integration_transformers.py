"""hwprune.integrations.transformers.PruningCallback: every method under transformers' Trainer
equals the plain API, resumes exactly from the Trainer's checkpoint folder, applies the
penalty, and refuses misuse with one HwpruneError."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import hwprune as hp
from hwprune.errors import HwpruneError
from hwprune.integrations.lifecycle import PRUNER_FILE, Finish
from hwprune.integrations.transformers import PruningCallback
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


class Wrapped(nn.Module):
    """The Trainer's calling convention: keyword inputs, a dict with the loss."""

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(SEED)
        self.model = model if model is not None else make_mlp()

    def forward(self, x, labels=None):
        logits = self.model(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = task()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def arguments(tmp_path: Path, epochs: int = EPOCHS, **kwargs) -> TrainingArguments:
    """Plain SGD as in the plain loop: momentum 0.9, constant LR, no clipping, batches in
    order."""
    settings = dict(output_dir=str(tmp_path), num_train_epochs=epochs,
                    per_device_train_batch_size=BATCH, learning_rate=LR, optim="sgd",
                    optim_args="momentum=0.9", lr_scheduler_type="constant", max_grad_norm=0.0,
                    weight_decay=0.0, train_sampling_strategy="sequential", save_strategy="no",
                    report_to=[], logging_strategy="no", use_cpu=True, seed=SEED,
                    disable_tqdm=True)
    return TrainingArguments(**{**settings, **kwargs})


def train(tmp_path, callback, model=None, resume=None, assist=True, extra=(), **kwargs):
    model = model if model is not None else Wrapped()
    trainer = Trainer(model=model, args=arguments(tmp_path, **kwargs), train_dataset=Rows(),
                      callbacks=[callback, *extra])
    if assist:
        callback.create_optimizer(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("case", method_cases(), ids=case_id)
def test_every_method_equals_the_plain_api(case, tmp_path):
    cls, kwargs = case
    ref_model, ref_pruner = plain_fit(cls, kwargs, penalty_first=True)
    callback = PruningCallback(cls, module="model", finish=Finish(finalize=True),
                               **copy.deepcopy(kwargs))
    model, trainer = train(tmp_path, callback)
    assert_same_result(model.model, callback.pruner, ref_model, ref_pruner)
    logged = [e for e in trainer.state.log_history if "hwprune/sparsity" in e]
    assert [e["hwprune/epochs"] for e in logged] == [1.0, 2.0]
    assert logged[-1]["hwprune/sparsity"] == pytest.approx(ref_pruner.sparsity())


class StopAt(TrainerCallback):
    """An interruption: training stops after step ``step`` (the schedule stays the full one)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_resumed_from_a_trainer_checkpoint_equals_an_uninterrupted_run(tmp_path):
    kwargs = {"structure": "2:4", "anneal_epochs": 2, "logit_lr": 5.0, "entropy_weight": 0.01}
    # a warm-up and a linear decay: the LR is mid-schedule where the run resumes
    schedule = {"lr_scheduler_type": "linear", "warmup_steps": 2}
    straight = PruningCallback(hp.DPP, module="model", **kwargs)
    model_a, _ = train(tmp_path / "a", straight, **schedule)
    # the interrupted run: checkpoints every 3 steps (mid-epoch), stopped after step 3
    first = PruningCallback(hp.DPP, module="model", **kwargs)
    train(tmp_path / "b", first, extra=[StopAt(3)], save_strategy="steps", save_steps=3,
          **schedule)
    assert first.pruner.steps == 3
    assert (tmp_path / "b" / "checkpoint-3" / PRUNER_FILE).is_file()
    resumed = PruningCallback(hp.DPP, module="model", **kwargs)
    model_b, _ = train(tmp_path / "b", resumed, resume=str(tmp_path / "b" / "checkpoint-3"),
                       **schedule)
    assert resumed.pruner.steps == straight.pruner.steps == EPOCHS * 4
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    for name, mask in straight.pruner.masks().items():
        assert torch.equal(mask, resumed.pruner.masks()[name])
    assert torch.equal(straight.pruner.generator.get_state(), resumed.pruner.generator.get_state())


def test_fix_pattern_at_equals_the_plain_api_and_resumes_fixed(tmp_path):
    kwargs = {"structure": "2:4", "noise_scale": 1.0, "logit_lr": 5.0}
    ref_model, ref_pruner = plain_fit(hp.DPP, kwargs, penalty_first=True, fix_after=1)
    straight = PruningCallback(hp.DPP, module="model", finish=Finish(finalize=True),
                               fix_pattern_at=1, **copy.deepcopy(kwargs))
    model, _ = train(tmp_path / "a", straight)
    assert_same_result(model.model, straight.pruner, ref_model, ref_pruner)
    # stopped at step 6, inside the second epoch: the checkpoint holds a fixed pattern
    first = PruningCallback(hp.DPP, module="model", fix_pattern_at=1, **copy.deepcopy(kwargs))
    train(tmp_path / "b", first, extra=[StopAt(6)], save_strategy="steps", save_steps=6)
    assert first.pruner.pattern_fixed
    resumed = PruningCallback(hp.DPP, module="model", finish=Finish(finalize=True),
                              fix_pattern_at=1, **copy.deepcopy(kwargs))
    model_b, _ = train(tmp_path / "b", resumed, resume=str(tmp_path / "b" / "checkpoint-6"))
    assert_same_result(model_b.model, resumed.pruner, ref_model, ref_pruner)


class PenaltyOnly(Wrapped):
    def forward(self, x, labels=None):
        return {"loss": 0.0 * self.model(x).sum()}


def test_the_penalty_acts_a_known_answer(tmp_path):
    callback = PruningCallback(hp.PSP, module="model", **PENALTY_ONLY)
    train(tmp_path, callback, model=PenaltyOnly())
    assert_penalty_alone_moved_alphas(callback.pruner)


def test_a_model_with_nothing_to_prune_is_one_error(tmp_path):
    with pytest.raises(HwpruneError, match="selects no weight"):
        train(tmp_path, PruningCallback(hp.DPP, module="model", structure="2:4"),
              model=Wrapped(nn.Sequential(nn.Linear(16, 4))))


def test_the_trainers_own_optimizer_without_the_methods_groups_is_one_error(tmp_path):
    # without create_optimizer the Trainer's optimizer holds PSP's alphas with the model's
    # weight decay, not the method's
    callback = PruningCallback(hp.PSP, module="model", structure="channel", alpha_decay=0.2)
    with pytest.raises(HwpruneError, match=re.escape("callback.create_optimizer(trainer)")):
        train(tmp_path, callback, assist=False)


def test_gradient_accumulation_adds_the_penalty_once_per_optimizer_step(tmp_path):
    kwargs = {"block": (1, 4), "unify": 0.25, "zero": 0.25, "rho": 0.05, "admm_interval": 1}
    ref_model, ref_pruner = plain_fit(hp.ADMM, kwargs, accumulate=2, penalty_first=True)
    callback = PruningCallback(hp.ADMM, module="model", finish=Finish(finalize=True), **kwargs)
    model, _ = train(tmp_path, callback, gradient_accumulation_steps=2)
    assert callback.pruner.steps == EPOCHS * 2
    assert_same_result(model.model, callback.pruner, ref_model, ref_pruner)
