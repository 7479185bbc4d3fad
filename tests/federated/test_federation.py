"""The federated run's own logic (phases, selection, kept rounds, privacy budget, resume, census)
over scripted sites: :class:`fedmae.federated.federation.FederatedRun` needs only its ``Sites``
interface, so these tests run it without Flower, sites or data. The same run over Flower's grid
and the real site code is tested in test_rounds.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmae.checkpoint import load_checkpoint
from fedmae.federated.federation import BudgetExhausted, FederatedRun, SiteReply, Weights
from tests.tiny import tiny_config


class Crash(Exception):
    pass


class ScriptedRounds:
    """Each round adds its round number to every floating-point weight; a round in ``keep``
    returns no aggregate, one in ``budget`` raises BudgetExhausted, one in ``crash`` raises."""

    def __init__(self, sites: ScriptedSites, phase: str):
        self.sites, self.phase, self.kept_previous = sites, phase, []

    validates_while_training = False

    def train(self, run_round: int, weights: Weights, validate: bool = False) -> tuple[Weights | None, dict[str, float]]:
        script = self.sites.script.get(self.phase, {})
        self.sites.trained.append((self.phase, run_round))
        if run_round in script.get("crash", ()):
            raise Crash
        if run_round in script.get("budget", ()):
            raise BudgetExhausted("epsilon would exceed the budget")
        if run_round in script.get("keep", ()):
            self.kept_previous.append(run_round)
            return None, {}
        return {k: v + run_round if v.is_floating_point() else v for k, v in weights.items()}, {}

    def evaluate(self, run_round: int, weights: Weights) -> dict[str, float]:
        scores = self.sites.script.get(self.phase, {}).get("scores", {})
        return {"main": scores.get(run_round, 0.0), "num-examples": 20.0}


class ScriptedSites:
    def __init__(self, nodes: int = 2, **script):
        self.nodes, self.script, self.trained, self.tested = list(range(1, nodes + 1)), script, [], []

    def connected(self) -> list[int]:
        return self.nodes

    def ask(self, nodes: list[int], request: dict, weights: Weights | None = None) -> list[SiteReply]:
        if request["phase"] == "describe":
            return [SiteReply(n, f"site-{n}", {"num-outputs": 2.0, "num-examples": 10.0}, {"class-names": "a\tb"})
                    for n in nodes]
        self.tested.append((request, weights))
        return [SiteReply(n, f"site-{n}", {"main": 0.5 + n / 10, "num-examples": 10.0 * n}) for n in nodes]

    def open_privacy(self, num_sites: int, saved_ledger: str | None):
        raise AssertionError("no privacy in these runs")

    def rounds(self, phase: str, *, site_names, site_images, metrics_log, privacy) -> ScriptedRounds:
        assert site_names == {1: "site-1", 2: "site-2"} and site_images == {1: 10, 2: 10}
        return ScriptedRounds(self, phase)


def config(**federated):
    return tiny_config(pretrain={"epochs": 4}, finetune={"epochs": 4}, federated={"min_sites": 1, **federated})


def run(sites: ScriptedSites, out: Path, resume: bool = False, **federated) -> dict:
    return FederatedRun(sites, config(**federated), out, resume=resume).run()


def weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "global" / name, expect_kind="global")["model"]


def test_fine_tuning_keeps_the_best_validation_round_ties_to_the_later_and_tests_it(tmp_path):
    sites = ScriptedSites(finetune={"scores": {1: 0.5, 2: 0.7, 3: 0.7, 4: 0.6}})
    summary = run(sites, tmp_path)
    assert summary["finetune"]["selected_round"] == 3
    assert sites.trained == [("pretrain", r) for r in (1, 2, 3, 4)] + [("finetune", r) for r in (1, 2, 3, 4)]
    (request, tested), = sites.tested
    assert request == {"phase": "finetune", "split": "test"}
    best = weights(tmp_path, "finetune_best.pt")
    assert all(torch.equal(tested[k], best[k]) for k in best)
    pooled = summary["finetune"]["test"]["pooled (example-weighted mean)"]
    assert pooled["main"] == pytest.approx((0.6 * 10 + 0.7 * 20) / 30) and pooled["num-examples"] == 30
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "done"


def test_a_round_without_an_aggregate_keeps_the_previous_global_model(tmp_path):
    sites = ScriptedSites(pretrain={"keep": [2]})
    summary = run(sites, tmp_path, finetune="none")
    assert summary["rounds_without_update"] == {"pretrain": [2]}
    after_1 = load_checkpoint(tmp_path / "global" / "pretrain_round_0002.pt")["model"]  # round 2 kept round 1's
    last = weights(tmp_path, "pretrain_last.pt")
    assert all(torch.equal(last[k], after_1[k] + 3 + 4) for k in last if last[k].is_floating_point())


def test_an_exhausted_privacy_budget_ends_training_with_the_last_released_model(tmp_path):
    sites = ScriptedSites(pretrain={"budget": [3]})
    summary = run(sites, tmp_path, finetune="none")
    assert "epsilon would exceed" in summary["privacy_budget_reached"]["pretrain"]
    assert load_checkpoint(tmp_path / "global" / "pretrain_last.pt")["extra"]["round"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "done"


def test_a_stopped_run_resumes_after_its_last_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    whole = tmp_path / "whole"
    run(ScriptedSites(), whole, finetune="none")
    stopped = tmp_path / "stopped"
    with pytest.raises(Crash):
        run(ScriptedSites(pretrain={"crash": [3]}), stopped, finetune="none")
    assert json.loads((stopped / "summary.json").read_text())["status"] == "failed"
    resumed = ScriptedSites()
    run(resumed, stopped, resume=True, finetune="none")
    assert resumed.trained == [("pretrain", 3), ("pretrain", 4)]
    a, b = weights(whole, "pretrain_last.pt"), weights(stopped, "pretrain_last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    marks = [json.loads(line) for line in (stopped / "rounds.jsonl").read_text().splitlines()]
    assert {"phase": "pretrain", "resumed_after_round": 2, "superseded_rounds": []} in marks


def test_too_few_sites_within_the_round_timeout_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(RuntimeError, match="federated.min_sites is 3"):
        run(ScriptedSites(nodes=2), tmp_path, min_sites=3, round_timeout=0.5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "start the missing sites" in summary["error"]
