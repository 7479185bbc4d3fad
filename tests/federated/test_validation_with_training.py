"""Pre-training's validation taken with the next round's training message: the same figures and
weights as a separate evaluate exchange, one exchange a round fewer."""

from __future__ import annotations

import pytest
import torch
from flwr.app import MessageType

from fedmae.federated import site_run
from server.grid_sites import GridRounds
from tests.federated.in_process import global_encoder, rounds_log, run, setup_run

SECTIONS = {"pretrain": {"epochs": 4, "warmup_epochs": 1}, "federated": {"min_sites": 1, "finetune": "none"}}


def validations(run_config: dict) -> dict[tuple[int, str], dict]:
    return {(r["round"], r["site"]): r["evaluation"] for r in rounds_log(run_config) if "evaluation" in r}


def test_validation_with_the_next_training_round_gives_the_separate_figures_with_fewer_messages(tmp_path):
    site_run.forget_site_runs()
    grid, riding = setup_run(tmp_path / "riding", **SECTIONS)
    run(grid, riding)
    evaluate_messages = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]

    site_run.forget_site_runs()
    grid, separate = setup_run(tmp_path / "separate", **{
        **SECTIONS, "federated": {**SECTIONS["federated"], "validate_with_training": False}})
    run(grid, separate)
    separate_messages = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]

    assert validations(riding) == validations(separate)
    assert {r for r, _ in validations(riding)} == {1, 2, 3, 4}
    a, b = global_encoder(riding), global_encoder(separate)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The describe request, then per round one evaluate request per site (separate) against
    # only the last round's (riding).
    assert len(separate_messages) - len(evaluate_messages) == 3 * 2
    training_metrics = [r for r in rounds_log(riding) if "usable" in r]
    assert not any("val_loss" in r for r in training_metrics)  # not averaged as a training metric


def test_a_resumed_run_validates_the_checkpointed_round_if_its_validation_was_lost(tmp_path, monkeypatch):
    sections = {**SECTIONS, "federated": {**SECTIONS["federated"], "checkpoint_every": 1}}
    grid, stopped = setup_run(tmp_path / "stopped", **sections)
    original = GridRounds.train

    def crash_in_round_3(self, run_round, weights, **kwargs):
        if run_round == 3:  # round 2's validation was to go out with this round
            raise KeyboardInterrupt
        return original(self, run_round, weights, **kwargs)

    monkeypatch.setattr(GridRounds, "train", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run(grid, stopped)
    monkeypatch.setattr(GridRounds, "train", original)
    assert {r for r, _ in validations(stopped)} == {1}
    site_run.forget_site_runs()
    run(grid, stopped, resume=True)
    records = [(r["round"], r["site"]) for r in rounds_log(stopped) if "evaluation" in r]
    assert sorted(records) == sorted({(n, s) for n in (1, 2, 3, 4) for s in ("site-0", "site-1")})  # each once
