"""A federated run of the real ServerApp and ClientApp code on the in-process grid, and what it
leaves in its output folder: the tests of rounds, privacy and secure aggregation share these."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedmae.checkpoint import load_checkpoint
from fedmae.federated.global_model import GlobalCheckpoints
from fedmae.federated.settings import experiment_config
from fedmae.models.state import encoder_state
from server.app import federated_run
from server.inprocess import InProcessGrid
from sites.app import app as client_app
from tests.tiny import tiny_raw


def setup_run(tmp_path: Path, num_sites: int = 2, **sections) -> tuple[InProcessGrid, dict]:
    defaults = {"data": {"num_sites": num_sites, "cases_per_site": 8, "flip_prob": 0.5},
                "pretrain": {"epochs": 2, "warmup_epochs": 1}, "finetune": {"epochs": 2, "warmup_epochs": 1},
                "federated": {"min_sites": 1, "finetune": "none"}}
    for name, values in sections.items():
        defaults[name] = {**defaults.get(name, {}), **values}
    raw = tiny_raw(2, **defaults)
    tmp_path.mkdir(parents=True, exist_ok=True)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(raw))
    run_config = {"experiment": str(experiment), "overrides": "", "output-dir": str(tmp_path / "out"), "resume": False}
    nodes = [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)]
    return InProcessGrid(client_app, nodes, run_config), run_config


def run(grid: InProcessGrid, run_config: dict, resume: bool = False) -> dict:
    cfg = experiment_config(run_config)
    return federated_run(grid, cfg, Path(run_config["output-dir"]), resume=resume).run()


def rounds_log(run_config: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(run_config["output-dir"]) / "rounds.jsonl").read_text().splitlines()]


def global_encoder(run_config: dict, name: str = "pretrain_last.pt") -> dict[str, torch.Tensor]:
    return encoder_state(load_checkpoint(Path(run_config["output-dir"]) / "global" / name)["model"])


class Interrupted(Exception):
    pass


def run_until_stopped_after_round_2(grid: InProcessGrid, run_config: dict, monkeypatch) -> None:
    """Run until the server has checkpointed round 2, then stop it as a crash would."""
    original = GlobalCheckpoints.save

    def save_then_stop(self, phase, server_round, *args, **kwargs):
        path = original(self, phase, server_round, *args, **kwargs)
        if server_round == 2:
            raise Interrupted
        return path

    monkeypatch.setattr(GlobalCheckpoints, "save", save_then_stop)
    with pytest.raises(Interrupted):
        run(grid, run_config)
    monkeypatch.setattr(GlobalCheckpoints, "save", original)
