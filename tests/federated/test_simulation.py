"""`fedmae simulate` end to end on Flower's simulation engine (Ray): real processes, offline."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fedmae.checkpoint import load_checkpoint
from fedmae.config import FederatedConfig
from fedmae.federated.simulate import client_resources, free_port
from fedmae.federated.watchdog import descendants, stop_pids
from tests.command_line import fedmae, flower_processes, write_config
from tests.tiny import tiny_raw


@pytest.mark.slow
def test_simulate_runs_twelve_sites_as_flower_clients_two_live_per_process_and_leaves_nothing_running(tmp_path):
    """Sites as Flower clients on the real engine, in bounded memory: twelve sites, each Ray actor
    keeps two live and rebuilds the others from their state on disk; every site trains every round
    of both phases and is tested; the CLI says where things go; nothing of Flower or Ray outlives
    the run. (One run for all of it: every simulation pays Flower's and Ray's start, ~15 s here.)"""
    before = flower_processes()
    raw = tiny_raw(2, data={"num_sites": 12, "cases_per_site": 4}, pretrain={"epochs": 2, "warmup_epochs": 1},
                   finetune={"epochs": 2, "warmup_epochs": 1},
                   federated={"min_sites": 12, "round_timeout": 300, "live_sites": 2, "cpus_per_site": 1,
                              "sites_per_gpu": 2})
    config = write_config(tmp_path, raw)
    result = fedmae("simulate", "--config", str(config), "--output", "fed", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "simulating 12 sites (1 CPU, 0.0 GPU each) with Flower" in result.stderr  # no GPU here: none asked for
    out = tmp_path / "fed"
    sites = {f"site-{i}" for i in range(12)}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sites"]) == sites
    assert set(summary["finetune"]["test"]["sites"]) == sites
    assert load_checkpoint(out / "global" / "pretrain_last.pt", expect_kind="global")["extra"]["round"] == 2
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    for phase in ("pretrain", "finetune"):
        trained = {(r["round"], r["site"]) for r in records if r.get("status") == "ok" and r["phase"] == phase}
        assert trained == {(n, site) for n in (1, 2) for site in sites}, phase
    assert all(not r["kept_previous_model"] for r in records if "usable" in r)
    assert "global checkpoints:" in result.stdout
    assert flower_processes() == before, "a Flower or Ray process outlived the run"


def test_simulate_checks_the_config_and_data_before_starting_flower(tmp_path):
    raw = tiny_raw(2, federated={"local_epochs": 2}, pretrain={"epochs": 3})
    result = fedmae("simulate", "--config", str(write_config(tmp_path, raw)), cwd=tmp_path)
    assert result.returncode == 2
    assert "federated.local_epochs: must be at least 1 and divide pretrain.epochs (3), got 2" in result.stderr
    assert not Path(tmp_path / "runs").exists()


@pytest.mark.slow
def test_simulate_with_client_side_differential_privacy(tmp_path):
    """The DP wrapper and the sites' clipping in real Flower processes: every update that reached
    the server was clipped at its site, and the run reports what it spent."""
    before = flower_processes()
    clip = 0.01
    raw = tiny_raw(2, data={"num_sites": 2, "cases_per_site": 8}, pretrain={"epochs": 2, "warmup_epochs": 1},
                   federated={"min_sites": 2, "round_timeout": 300, "finetune": "none",
                              "privacy": {"dp": "client", "noise_multiplier": 1.0, "clipping_norm": clip}})
    result = fedmae("simulate", "--config", str(write_config(tmp_path, raw)), "--output", "fed", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "fed" / "summary.json").read_text())
    assert summary["privacy"]["releases"] == 2 and summary["privacy"]["epsilon"] > 0
    records = [json.loads(line) for line in (tmp_path / "fed" / "rounds.jsonl").read_text().splitlines()]
    ok = [r for r in records if r.get("status") == "ok"]
    assert len(ok) == 4
    assert all(r["update_norm_before_clipping"] > clip >= r["update_norm"] * (1 - 1e-6) for r in ok)
    assert flower_processes() == before, "a Flower or Ray process outlived the run"


@pytest.mark.slow
def test_simulate_with_secure_aggregation(tmp_path):
    """SecAgg+ rounds in real Flower processes: three sites, every round aggregated securely."""
    before = flower_processes()
    raw = tiny_raw(2, data={"num_sites": 3, "cases_per_site": 8}, pretrain={"epochs": 2, "warmup_epochs": 1},
                   federated={"min_sites": 3, "round_timeout": 300, "finetune": "none",
                              "privacy": {"secure_aggregation": True}})
    result = fedmae("simulate", "--config", str(write_config(tmp_path, raw)), "--output", "fed", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "fed" / "rounds.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "usable" in r]
    assert [(r["round"], r["usable"], r["secure_aggregation"], r["kept_previous_model"]) for r in rounds] == [
        (1, 3, True, False), (2, 3, True, False)]
    assert load_checkpoint(tmp_path / "fed" / "global" / "pretrain_last.pt", expect_kind="global")["extra"]["round"] == 2
    assert flower_processes() == before, "a Flower or Ray process outlived the run"


def test_client_resources_follow_the_sites_share_settings():
    fed = FederatedConfig()
    # Defaults: the cores shared so that every site runs at once, the GPUs spread evenly, at most one each.
    assert client_resources(4, cpus=16, fed=fed, gpus=0) == {"num-cpus": 4, "num-gpus": 0.0}
    assert client_resources(8, cpus=16, fed=fed, gpus=2) == {"num-cpus": 2, "num-gpus": 0.25}
    assert client_resources(2, cpus=16, fed=fed, gpus=4) == {"num-cpus": 8, "num-gpus": 1.0}
    # sites_per_gpu=4: four virtual sites share each GPU (Ray runs 4 per GPU at once), whatever the site count.
    shared = dataclasses.replace(fed, sites_per_gpu=4, cpus_per_site=2)
    assert client_resources(71, cpus=16, fed=shared, gpus=2) == {"num-cpus": 2, "num-gpus": 0.25}
    assert client_resources(71, cpus=16, fed=shared, gpus=0) == {"num-cpus": 2, "num-gpus": 0.0}  # CPU machine: no GPU asked
    with pytest.raises(ValueError, match=r"^federated.cpus_per_site: 32, but the simulation has 16 core\(s\)"):
        client_resources(4, cpus=16, fed=dataclasses.replace(fed, cpus_per_site=32), gpus=0)
    # On a Ray cluster this machine's cores and GPUs do not count: the sites ask for what is set.
    cluster = dataclasses.replace(fed, ray_address="10.0.0.5:6379")
    assert client_resources(71, cpus=2, fed=cluster, gpus=0) == {"num-cpus": 1, "num-gpus": 0.0}
    assert client_resources(71, cpus=2, fed=dataclasses.replace(cluster, cpus_per_site=8, sites_per_gpu=4),
                            gpus=0) == {"num-cpus": 8, "num-gpus": 0.25}


def test_the_sites_share_settings_are_checked(tmp_path):
    for key in ("cpus_per_site", "sites_per_gpu"):
        raw = tiny_raw(2, federated={key: 0})
        result = fedmae("simulate", "--config", str(write_config(tmp_path, raw)), cwd=tmp_path)
        assert result.returncode == 2 and f"federated.{key}: must be at least 1 (or unset), got 0" in result.stderr


@pytest.mark.slow
def test_simulate_joins_a_running_ray_cluster_and_leaves_it_running(tmp_path):
    """federated.ray_address: the simulation's sites run on a Ray cluster it did not start (here a
    head node on loopback, started and stopped by pid), which is still up after the run."""
    before = flower_processes()
    port, client_port = free_port(), free_port()
    ray_dir = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        [shutil.which("ray") or "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--ray-client-server-port", str(client_port), "--num-cpus", "2", "--include-dashboard", "false",
         "--disable-usage-stats", "--temp-dir", str(ray_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        started = ""
        for line in head.stdout:
            started += line
            if "Ray runtime started" in line:
                break
        assert "Ray runtime started" in started, started[-2000:]
        raw = tiny_raw(2, data={"num_sites": 2, "cases_per_site": 4}, pretrain={"epochs": 2, "warmup_epochs": 1},
                       federated={"min_sites": 2, "round_timeout": 300, "finetune": "none",
                                  "ray_address": f"127.0.0.1:{port}"})
        result = fedmae("simulate", "--config", str(write_config(tmp_path, raw)), "--output", "fed", cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"simulating 2 sites (1 CPU, 0.0 GPU each) with Flower on the Ray cluster at 127.0.0.1:{port}" in result.stderr
        records = [json.loads(line) for line in (tmp_path / "fed" / "rounds.jsonl").read_text().splitlines()]
        assert {(r["round"], r["site"]) for r in records if r.get("status") == "ok"} == {
            (n, f"site-{i}") for n in (1, 2) for i in range(2)}
        # The sites ran as the cluster's workers (their logs are in its session folder), and the
        # cluster is still up: the run stopped only what it started.
        actors = [p for p in ray_dir.glob("session_latest/logs/worker-*.out") if ":actor_name:ClientAppActor" in p.read_text()]
        assert len(actors) >= 1
        assert head.poll() is None
    finally:
        cluster = [head.pid, *descendants(head.pid)]
        head.terminate()
        head.wait(timeout=60)
        stop_pids(cluster)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert flower_processes() == before, "a Flower or Ray process outlived the run"
