"""The step loop and the run loops around it: divergence, validation and checkpoint cadence."""

from __future__ import annotations

import math

import pytest
import torch

from fedmae.checkpoint import load_checkpoint
from fedmae.data.cohort import load_cohort
from fedmae.engine.finetune import finetune
from fedmae.engine.loop import MetricsLog, NonFiniteLossError, Schedule, due, train_one_epoch
from fedmae.engine.pretrain import pretrain
from tests.tiny import tiny_config


def test_a_diverging_loss_names_its_step():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [{"x": torch.ones(4, 2)} for _ in range(5)]
    calls = iter(range(100))

    def loss_of_batch(net, batch):
        loss = net(batch["x"]).pow(2).mean()
        return loss * math.inf if next(calls) == 3 else loss  # the fourth step (global step 13) diverges

    with pytest.raises(NonFiniteLossError, match="loss became (nan|inf) at step 13; lower the learning rate"):
        train_one_epoch(model, batches, optimizer, loss_of_batch, Schedule(0.1, 0.0, 0, 100), 10,
                        torch.device("cpu"), clip_grad=None)


def test_mean_loss_is_weighted_by_batch_size():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [{"x": torch.full((3, 1), 1.0)}, {"x": torch.full((1, 1), 3.0)}]
    mean, step = train_one_epoch(model, batches, optimizer, lambda net, b: (net(b["x"]) - b["x"]).pow(2).mean(),
                                 Schedule(0.0, 0.0, 0, 10), 0, torch.device("cpu"), clip_grad=None)
    assert step == 2 and mean == pytest.approx((3 * 1.0 + 1 * 9.0) / 4)


def test_due_epochs():
    assert [e for e in range(1, 11) if due(e, 4, 10)] == [4, 8, 10]
    assert [e for e in range(1, 4) if due(e, 1, 3)] == [1, 2, 3]


def test_validation_and_checkpoints_follow_their_cadence(tmp_path):
    cfg = tiny_config(2, pretrain={"epochs": 5, "eval_every": 2, "checkpoint_every": 3},
                      finetune={"epochs": 5, "eval_every": 2, "checkpoint_every": 4})
    cohort = load_cohort(cfg)
    last = tmp_path / "pre" / "checkpoint_last.pt"
    saved = []  # the epoch of the checkpoint on disk after each epoch
    pre = pretrain(cfg, tmp_path / "pre", cohort=cohort,
                   on_epoch_end=lambda e, r: saved.append(load_checkpoint(last)["epoch"] if last.exists() else None))
    assert saved == [None, None, 3, 3, 5]  # and always after the last epoch
    records = MetricsLog(tmp_path / "pre" / "metrics.jsonl").read()
    assert [r["epoch"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert "val_loss" in pre.metrics
    ft = finetune(cfg, tmp_path / "ft", encoder=pre.checkpoint, cohort=cohort)
    records = MetricsLog(tmp_path / "ft" / "metrics.jsonl").read()
    assert [r["epoch"] for r in records if "val_mean_auc" in r] == [2, 4, 5]
    assert ft.metrics["selected_epoch"] in (2, 4, 5)  # only validated epochs can be selected
    assert load_checkpoint(tmp_path / "ft" / "checkpoint_last.pt")["epoch"] == 5


def test_a_divergence_found_at_a_later_check_names_the_steps_it_may_be_in():
    # On a GPU the summed loss is read every few steps: the error names the range since the last read.
    from fedmae.engine.loop import _check_finite

    _check_finite(torch.tensor(1.0, dtype=torch.float64), "pretrain", 10, 60)  # finite: nothing to say
    with pytest.raises(NonFiniteLossError, match=r"pretrain: loss became nan at one of steps 10\.\.59"):
        _check_finite(torch.tensor(math.nan, dtype=torch.float64), "pretrain", 10, 60)
