"""federated.checkpoint_every: the global model and a simulated site's state written every few
rounds (and after the last), with the result of an every-round run and an exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmae.federated import site_run
from server.grid_sites import GridRounds
from server.inprocess import InProcessGrid
from sites.app import app as client_app
from tests.federated.in_process import global_encoder, rounds_log, run, setup_run

FIVE_ROUNDS = {"pretrain": {"epochs": 5, "warmup_epochs": 1}}


def cadence(every: int) -> dict:
    return {**FIVE_ROUNDS, "federated": {"min_sites": 1, "finetune": "none", "checkpoint_every": every}}


def rounds_on_disk(folder: Path, pattern: str) -> list[int]:
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in folder.glob(pattern))


def test_checkpoints_every_few_rounds_give_the_weights_of_every_round(tmp_path):
    grid, every_round = setup_run(tmp_path / "every-round", **cadence(1))
    run(grid, every_round)
    grid, every_two = setup_run(tmp_path / "every-two", **cadence(2))
    run(grid, every_two)

    out = Path(every_two["output-dir"])
    # The newest three of rounds 2, 4 and 5 (the last); each site keeps its newest two states.
    assert rounds_on_disk(out / "global", "pretrain_round_*.pt") == [2, 4, 5]
    assert rounds_on_disk(out / "sites" / "site-0" / "pretrain", "round_*.pt") == [4, 5]
    a, b = global_encoder(every_round), global_encoder(every_two)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_between_checkpoints_resumes_from_the_last_one_exactly(tmp_path, monkeypatch):
    grid, straight = setup_run(tmp_path / "straight", **cadence(1))
    run(grid, straight)

    grid, stopped = setup_run(tmp_path / "stopped", **cadence(2))
    original = GridRounds.train

    def crash_in_round_4(self, run_round, weights, **kwargs):
        if run_round == 4:
            raise KeyboardInterrupt  # the whole simulation stops: server and sites
        return original(self, run_round, weights, **kwargs)

    monkeypatch.setattr(GridRounds, "train", crash_in_round_4)
    with pytest.raises(KeyboardInterrupt):
        run(grid, stopped)
    monkeypatch.setattr(GridRounds, "train", original)
    out = Path(stopped["output-dir"])
    assert rounds_on_disk(out / "global", "pretrain_round_*.pt") == [2]
    assert rounds_on_disk(out / "sites" / "site-0" / "pretrain", "round_*.pt") == [2]  # round 3 only in memory

    site_run.forget_site_runs()  # a new simulation: the sites' live state is gone with the old one
    run(grid, stopped, resume=True)
    assert {"phase": "pretrain", "resumed_after_round": 2, "superseded_rounds": [3]} in rounds_log(stopped)
    a, b = global_encoder(straight), global_encoder(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_site_dropped_from_memory_writes_its_state_and_ends_as_a_live_one(tmp_path):
    grid, kept = setup_run(tmp_path / "all-live", num_sites=3, **cadence(5))
    run(grid, kept)
    site_run.forget_site_runs()
    sections = cadence(5)
    grid, bounded = setup_run(tmp_path / "one-live", num_sites=3,
                              **{**sections, "federated": {**sections["federated"], "live_sites": 1}})
    run(grid, bounded)
    a, b = global_encoder(kept), global_encoder(bounded)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_deployed_site_writes_its_state_every_round_whatever_the_cadence(tmp_path):
    """Flower's SuperNode runs a ClientApp process per message: a deployed site cannot keep its
    state in memory, so it writes it every round; a simulated one only at the checkpoints."""
    grid, simulated = setup_run(tmp_path / "simulated", **cadence(5))
    run(grid, simulated)
    assert rounds_on_disk(Path(simulated["output-dir"]) / "sites" / "site-0" / "pretrain", "round_*.pt") == [5]

    _, deployed = setup_run(tmp_path / "deployed", **cadence(5))
    state = tmp_path / "hospital-state"
    grid = InProcessGrid(client_app, [{"site": f"site-{i}", "state-dir": str(state)} for i in range(2)], deployed)
    run(grid, deployed)
    (folder,) = state.glob("*/site-0/pretrain")
    assert rounds_on_disk(folder, "round_*.pt") == [4, 5]
