"""An interrupted-and-resumed run ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from fedmae.checkpoint import load_checkpoint
from fedmae.data.cohort import load_cohort
from fedmae.engine.finetune import finetune
from fedmae.engine.loop import MetricsLog
from fedmae.engine.pretrain import pretrain
from fedmae.engine.runs import OutputError
from tests.tiny import tiny_config


class Killed(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


def kill_after(epoch: int):
    def callback(done: int, record: dict) -> None:
        if done == epoch:
            raise Killed

    return callback


def assert_same_weights(a, b):
    state_a, state_b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def losses(path):
    return [(r["epoch"], r["train_loss"]) for r in MetricsLog(path / "metrics.jsonl").read()]


@pytest.mark.parametrize("dims", [2, 3])
def test_pretraining_resumes_to_identical_weights(tmp_path, dims):
    cfg = tiny_config(dims, data={"image_size": [40] * dims, "flip_prob": 0.5}, pretrain={"epochs": 3})
    cohort = load_cohort(cfg)
    straight = pretrain(cfg, tmp_path / "straight", cohort=cohort)
    with pytest.raises(Killed):
        pretrain(cfg, tmp_path / "resumed", cohort=cohort, on_epoch_end=kill_after(2))
    with pytest.raises(OutputError, match="--resume"):
        pretrain(cfg, tmp_path / "resumed", cohort=cohort)  # never silently overwrite a run
    resumed = pretrain(cfg, tmp_path / "resumed", cohort=cohort, resume=True)
    assert_same_weights(straight.checkpoint, resumed.checkpoint)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert load_checkpoint(resumed.checkpoint)["epoch"] == 3


def test_finetuning_resumes_to_identical_weights(tmp_path):
    cfg = tiny_config(2, "segmentation", finetune={"epochs": 3})
    cohort = load_cohort(cfg)
    encoder = pretrain(cfg, tmp_path / "pre", cohort=cohort).checkpoint
    straight = finetune(cfg, tmp_path / "straight", encoder=encoder, cohort=cohort)
    with pytest.raises(Killed):
        finetune(cfg, tmp_path / "resumed", encoder=encoder, cohort=cohort, on_epoch_end=kill_after(1))
    resumed = finetune(cfg, tmp_path / "resumed", encoder=encoder, cohort=cohort, resume=True)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert_same_weights(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    assert straight.metrics["pooled"] == resumed.metrics["pooled"]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_run_checkpointed_every_few_epochs_resumes_to_identical_weights(tmp_path, stage):
    # Killed after epoch 3 with checkpoints every 2 epochs: epoch 3 is redone from epoch 2's state.
    cadence = {"epochs": 4, "checkpoint_every": 2, "eval_every": 2}
    cfg = tiny_config(2, data={"image_size": [40, 40], "flip_prob": 0.5}, pretrain=cadence, finetune=cadence)
    cohort = load_cohort(cfg)
    encoder = pretrain(cfg, tmp_path / "pre", cohort=cohort).checkpoint if stage == "finetune" else None

    def run(folder, **kwargs):
        if stage == "pretrain":
            return pretrain(cfg, tmp_path / folder, cohort=cohort, **kwargs)
        return finetune(cfg, tmp_path / folder, encoder=encoder, cohort=cohort, **kwargs)

    straight = run("straight")
    with pytest.raises(Killed):
        run("resumed", on_epoch_end=kill_after(3))
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint_last.pt")["epoch"] == 2
    resumed = run("resumed", resume=True)
    assert_same_weights(straight.checkpoint, resumed.checkpoint)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert straight.metrics.get("pooled") == resumed.metrics.get("pooled")


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = tiny_config(2, pretrain={"epochs": 2})
    cohort = load_cohort(cfg)
    with pytest.raises(Killed):
        pretrain(cfg, tmp_path, cohort=cohort, on_epoch_end=kill_after(1))
    changed = tiny_config(2, pretrain={"epochs": 2, "base_lr": 0.5})
    with pytest.raises(ValueError, match="config differs .* pretrain.base_lr"):
        pretrain(changed, tmp_path, cohort=cohort, resume=True)


def test_finetune_resume_refuses_another_encoder(tmp_path):
    cfg = tiny_config(2, finetune={"epochs": 2})
    cohort = load_cohort(cfg)
    encoder = pretrain(cfg, tmp_path / "pre", cohort=cohort).checkpoint
    with pytest.raises(Killed):
        finetune(cfg, tmp_path / "ft", encoder=encoder, cohort=cohort, on_epoch_end=kill_after(1))
    with pytest.raises(ValueError, match="cannot resume, the run started from .*checkpoint_last.pt, not random"):
        finetune(cfg, tmp_path / "ft", cohort=cohort, resume=True)
