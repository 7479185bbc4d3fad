"""Adaptive-clipping DP (Flower's wrappers through fedmae): the norm follows the updates in the
right direction on either side, every release is accounted, and a resumed run keeps the norm."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedmae.federated.settings import experiment_config
from fedmae.typed_yaml import ConfigError
from server.privacy import new_accountant
from tests.federated.in_process import rounds_log, run, run_until_stopped_after_round_2, setup_run

# A count noise far below one site: the clipped fraction is what it is, and the norm's path is known.
EXACT_COUNT = {"clipping": "adaptive", "clipped_count_stddev": 1e-6, "noise_multiplier": 1e-7, "clip_norm_lr": 0.2}


def adaptive(side: str, clip: float, **more) -> dict:
    return {"min_sites": 2, "privacy": {"dp": side, "clipping_norm": clip, **EXACT_COUNT, **more}}


def norms(run_config: dict) -> list[float]:
    return [r["clipping_norm"] for r in rounds_log(run_config) if "usable" in r and r["phase"] == "pretrain"]


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("start,direction", [(1e-4, +1), (1e3, -1)])
def test_the_norm_grows_while_every_update_is_clipped_and_shrinks_while_none_is(tmp_path, side, start, direction):
    grid, run_config = setup_run(tmp_path, pretrain={"epochs": 3, "warmup_epochs": 1}, federated=adaptive(side, start))
    summary = run(grid, run_config)
    # All clipped (fraction 1) or none (fraction 0) against a target of 0.5: x exp(+-0.2 * 0.5) a round.
    expected = [start * math.exp(direction * 0.1 * r) for r in range(3)]
    assert norms(run_config) == pytest.approx(expected, rel=1e-4)
    assert summary["privacy"]["adapted_clipping_norms"]["pretrain"] == pytest.approx(start * math.exp(direction * 0.3), rel=1e-4)
    ok = [r for r in rounds_log(run_config) if r.get("status") == "ok"]
    if side == "client":
        # Each site clipped to the round's norm, which came in its request, and said whether it had to.
        train = [m for m in grid.sent if m.metadata.message_type == "train"]
        assert sorted({float(m.content["config"]["clipping_norm"]) for m in train}) == pytest.approx(sorted(expected), rel=1e-4)
        assert {r["norm_bit"] for r in ok} == {1.0 if direction > 0 else 0.0}
    accountant = new_accountant(experiment_config(run_config).federated.privacy, 2)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=1e-7, sample_size=2, population_size=2), 3)
    assert summary["privacy"]["releases"] == 3
    assert summary["privacy"]["epsilon"] == pytest.approx(accountant.get_privacy_spent().epsilon, rel=1e-6)


def test_a_resumed_run_continues_from_the_adapted_norm(tmp_path, monkeypatch):
    sections = {"pretrain": {"epochs": 4, "warmup_epochs": 1}, "federated": adaptive("client", 1e-4)}
    grid, straight = setup_run(tmp_path / "straight", **sections)
    run(grid, straight)
    grid, stopped = setup_run(tmp_path / "stopped", **sections)
    run_until_stopped_after_round_2(grid, stopped, monkeypatch)
    resumed = run(grid, stopped, resume=True)
    assert norms(stopped) == pytest.approx(norms(straight), rel=1e-6)  # not back to 1e-4 at round 3
    assert resumed["privacy"]["releases"] == 4


def test_noise_the_clipped_count_cannot_pay_for_is_refused_in_one_line(tmp_path):
    grid, run_config = setup_run(tmp_path, federated=adaptive("server", 1.0, noise_multiplier=1.0, clipped_count_stddev=None))
    with pytest.raises(ConfigError, match=r"clipped_count_stddev: adaptive clipping with noise_multiplier 1.0 needs .* "
                                          r"2 sampled sites / 20"):
        run(grid, run_config)
    assert not (Path(run_config["output-dir"]) / "global" / "pretrain_round_0001.pt").exists()
