"""Differential privacy through Flower's DP wrappers, run by the real ServerApp and ClientApp code
in one process: clipping on either side, the noise, the accounting, the budget stop, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import Message
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedmae.checkpoint import load_checkpoint
from fedmae.config import load_config
from fedmae.federated.global_model import initial_encoder
from fedmae.federated.settings import experiment_config
from fedmae.typed_yaml import ConfigError
from server.privacy import new_accountant
from tests.federated.in_process import global_encoder, rounds_log, run, run_until_stopped_after_round_2, setup_run


def dp(side: str, noise: float, clip: float, **more) -> dict:
    return {"min_sites": 2, "privacy": {"dp": side, "noise_multiplier": noise, "clipping_norm": clip, **more}}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def start_encoder(run_config: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("encoder."): v for k, v in initial_encoder(experiment_config(run_config)).items()}


@pytest.mark.parametrize("side", ["server", "client"])
def test_updates_are_clipped_to_the_norm_on_either_side(tmp_path, side):
    # Negligible noise, a clipping norm well below the sites' real update norms: the first
    # round's global update is an average of clipped updates, so its norm is at most the clip.
    clip = 0.005
    grid, run_config = setup_run(tmp_path, pretrain={"epochs": 1, "warmup_epochs": 0},
                                 federated=dp(side, 1e-9, clip))
    run(grid, run_config)
    ok = [r for r in rounds_log(run_config) if r.get("status") == "ok"]
    assert len(ok) == 2
    moved = distance(global_encoder(run_config), start_encoder(run_config))
    assert 0 < moved <= clip * (1 + 1e-6)
    if side == "client":
        # The site clipped before sending: the server saw clipped updates only.
        assert all(r["update_norm_before_clipping"] > clip for r in ok)
        assert all(r["update_norm"] <= clip * (1 + 1e-6) for r in ok)
        train = [m for m in grid.sent if m.metadata.message_type == "train"]
        assert all(float(m.content["config"]["clipping_norm"]) == clip for m in train)
    else:
        assert all(r["update_norm"] > clip for r in ok)  # clipped by the server, after the checks


def test_noise_has_the_calibrated_spread_and_spares_the_fixed_position_embedding(tmp_path):
    noise, clip, sites = 1.0, 0.02, 2
    grid, run_config = setup_run(tmp_path, pretrain={"epochs": 1, "warmup_epochs": 0},
                                 federated=dp("server", noise, clip))
    summary = run(grid, run_config)
    start, final = start_encoder(run_config), global_encoder(run_config)
    assert torch.equal(final["pos_embed"], start["pos_embed"])
    changes = torch.cat([(final[k] - start[k]).flatten() for k in final if k != "pos_embed"])
    # The clipped average moves the weights by at most `clip` in total; the noise dominates.
    assert float(changes.std()) == pytest.approx(noise * clip / sites, rel=0.05)
    assert summary["privacy"]["releases"] == 1


def test_epsilon_is_accounted_per_round_across_both_phases(tmp_path):
    grid, run_config = setup_run(tmp_path, federated={**dp("client", 2.0, 1.0), "finetune": "federated"})
    summary = run(grid, run_config)
    epsilons = [(r["phase"], r["round"], r["epsilon"]) for r in rounds_log(run_config) if "epsilon" in r]
    assert [(p, r) for p, r, _ in epsilons] == [("pretrain", 1), ("pretrain", 2), ("finetune", 1), ("finetune", 2)]
    assert all(a[2] < b[2] for a, b in zip(epsilons, epsilons[1:]))
    expected = new_accountant(experiment_config(run_config).federated.privacy, 2)
    expected.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=2, population_size=2), 4)
    assert summary["privacy"]["epsilon"] == pytest.approx(expected.get_privacy_spent().epsilon, abs=1e-4)
    assert summary["privacy"]["releases"] == 4 and "one whole site" in summary["privacy"]["guarantee"]


def load_config_for(tmp_path: Path, federated: dict):
    _, run_config = setup_run(tmp_path / "probe", federated=federated)
    return experiment_config(run_config)


def test_a_run_stops_training_when_the_next_round_would_exceed_max_epsilon(tmp_path):
    one_round = new_accountant(load_config_for(tmp_path, dp("server", 2.0, 1.0)).federated.privacy, 2)
    one_round.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=2, population_size=2))
    budget = one_round.get_privacy_spent().epsilon * 1.01
    grid, run_config = setup_run(tmp_path, pretrain={"epochs": 3, "warmup_epochs": 1},
                                 federated={**dp("server", 2.0, 1.0, max_epsilon=budget), "finetune": "federated"})
    summary = run(grid, run_config)
    assert [r["round"] for r in rounds_log(run_config) if "epsilon" in r] == [1]
    assert set(summary["privacy_budget_reached"]) == {"pretrain", "finetune"}
    assert summary["privacy"]["epsilon"] <= budget
    assert summary["finetune"] == {"mode": "federated", "rounds": 0, "test": {}}
    assert (Path(run_config["output-dir"]) / "global" / "pretrain_last.pt").exists()


def test_a_missing_site_means_no_release_under_dp(tmp_path):
    grid, run_config = setup_run(tmp_path, federated=dp("server", 1.0, 1.0))

    def crash_in_round_2(request: Message) -> str | None:
        is_round_2 = request.metadata.message_type == "train" and int(request.content["config"]["round"]) == 2
        return "site-1 lost power" if is_round_2 else None

    grid.crashes = {101: crash_in_round_2}
    summary = run(grid, run_config)
    assert summary["rounds_without_update"]["pretrain"] == [2]
    kept = next(r for r in rounds_log(run_config) if r.get("kept_previous_model"))
    assert "calibrated for every sampled site" in kept["reason"]
    assert summary["privacy"]["releases"] == 1  # the withheld round spent nothing


def test_a_resumed_run_keeps_counting_the_privacy_spent(tmp_path, monkeypatch):
    sections = {"pretrain": {"epochs": 3, "warmup_epochs": 1}, "federated": dp("server", 1.5, 1.0)}
    grid, straight = setup_run(tmp_path / "straight", **sections)
    expected = run(grid, straight)["privacy"]

    grid, stopped = setup_run(tmp_path / "stopped", **sections)
    run_until_stopped_after_round_2(grid, stopped, monkeypatch)
    resumed = run(grid, stopped, resume=True)["privacy"]
    assert resumed["releases"] == expected["releases"] == 3
    assert resumed["epsilon"] == pytest.approx(expected["epsilon"])
    saved = load_checkpoint(Path(stopped["output-dir"]) / "global" / "pretrain_last.pt")["metrics"]
    assert '"count"' in saved["privacy"]


@pytest.mark.parametrize("override,message", [
    ("federated.strategy=fedadam", "federated.strategy: differential privacy needs fedavg"),
    ("federated.fraction_train=0.5", "federated.fraction_train: must be 1 with differential privacy"),
    ("federated.privacy.noise_multiplier=0", "federated.privacy.noise_multiplier: must be positive"),
    ("federated.privacy.secure_aggregation=true", "federated.privacy.dp: differential privacy together with secure"),
])
def test_impossible_privacy_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/federated-demo.yaml", ["federated.privacy.dp=server", override])
