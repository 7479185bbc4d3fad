"""Flower's adaptive and robust strategies through fedmae's reply checks, on the in-process grid:
each runs, and against a site that sends a large (finite) poisoned update the robust ones keep the
global model where the honest sites put it while FedAvg's is dragged away."""

from __future__ import annotations

import pytest
import torch

from fedmae.config import load_config
from fedmae.federated.settings import check_site_count
from fedmae.federated.site_run import SiteRun
from fedmae.typed_yaml import ConfigError
from tests.command_line import write_config
from tests.federated.in_process import global_encoder, rounds_log, run, setup_run
from tests.tiny import tiny_raw

def averaged_every_round(run_config: dict) -> bool:
    """No round kept the previous global model (a robust rule with too few updates would)."""
    rounds = [r for r in rounds_log(run_config) if "usable" in r]
    return bool(rounds) and not any(r["kept_previous_model"] for r in rounds)


@pytest.fixture(scope="module")
def fedavg_of_three_sites(tmp_path_factory) -> dict[str, torch.Tensor]:
    grid, fedavg = setup_run(tmp_path_factory.mktemp("fedavg"), num_sites=3)
    run(grid, fedavg)
    return global_encoder(fedavg)


@pytest.mark.parametrize("strategy", ["fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_each_flower_strategy_runs_through_the_reply_checks(tmp_path, strategy, fedavg_of_three_sites):
    grid, other = setup_run(tmp_path / strategy, num_sites=3,
                            federated={"strategy": strategy, "server_lr": 0.1, "byzantine_sites": 0})
    run(grid, other)
    trained = [r for r in rounds_log(other) if r.get("status") == "ok"]
    assert {(r["round"], r["site"]) for r in trained} == {(n, f"site-{i}") for n in (1, 2) for i in range(3)}
    assert averaged_every_round(other)
    a, b = fedavg_of_three_sites, global_encoder(other)
    assert all(torch.isfinite(t).all() for t in b.values() if t.is_floating_point())
    # Even where the rule is a plain mean (Bulyan with no byzantine allowance, FedTrimmedAvg cutting
    # nothing of three) it is unweighted, while FedAvg weights the sites by their training images.
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy,sites,needed", [("krum", 4, 5), ("multikrum", 4, 5), ("bulyan", 6, 7)])
def test_too_few_sites_for_the_byzantine_count_is_refused_in_one_line(tmp_path, strategy, sites, needed):
    cfg = load_config(write_config(tmp_path, tiny_raw(2)), [f"federated.strategy={strategy}", "federated.byzantine_sites=1"])
    with pytest.raises(ValueError, match=rf"^federated.strategy: {strategy} with byzantine_sites=1 needs {needed} sites"):
        check_site_count(cfg, sites)
    check_site_count(cfg, needed)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_strategies_are_refused_with_differential_privacy_or_secure_aggregation(tmp_path, strategy):
    config = write_config(tmp_path, tiny_raw(2))
    for privacy in ("dp=server", "secure_aggregation=true"):
        with pytest.raises(ConfigError, match="federated.strategy"):
            load_config(config, [f"federated.strategy={strategy}", f"federated.privacy.{privacy}"])


POISON = 10.0  # added to every weight of site-0's reply: a large update, finite, so it passes the reply checks


def poisoned_run(tmp_path, monkeypatch, strategy: str) -> dict[str, torch.Tensor]:
    original = SiteRun.train

    def train(self, request, received):
        state, metrics = original(self, request, received)
        if self.name == "site-0":
            state = {k: v + POISON if v.is_floating_point() else v for k, v in state.items()}
        return state, metrics

    monkeypatch.setattr(SiteRun, "train", train)
    grid, run_config = setup_run(tmp_path / strategy, num_sites=7, federated={"strategy": strategy, "byzantine_sites": 1})
    run(grid, run_config)
    monkeypatch.setattr(SiteRun, "train", original)
    assert averaged_every_round(run_config), strategy
    return global_encoder(run_config)


@pytest.mark.slow
def test_a_poisoned_site_drags_fedavg_away_but_not_the_robust_strategies(tmp_path, monkeypatch):
    grid, clean_run = setup_run(tmp_path / "clean", num_sites=7, federated={"byzantine_sites": 1})
    run(grid, clean_run)
    clean = global_encoder(clean_run)

    def shift(encoder: dict[str, torch.Tensor]) -> float:
        """The largest change of any weight against the clean FedAvg run."""
        return max(float((encoder[k] - clean[k]).abs().max()) for k in clean if clean[k].is_floating_point())

    shifts = {strategy: shift(poisoned_run(tmp_path, monkeypatch, strategy))
              for strategy in ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")}
    print("largest weight shift against the clean FedAvg run:", shifts)
    # FedAvg takes a seventh of the poison every round (two rounds).
    assert shifts["fedavg"] > POISON / 7
    for strategy in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        assert shifts[strategy] < 0.01 * shifts["fedavg"], (strategy, shifts)
