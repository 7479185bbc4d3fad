"""Deployment faults, at the process level, on one loopback federation (tests/deploy/loopback.py):
a SuperNode killed (SIGKILL) mid-round and restarted; the SuperLink killed mid-round, restarted on
its database and the run resumed, ending with the same weights as an uninterrupted run; a site's
newest state file corrupted between rounds (the site refuses the rounds that need it, in one line);
a ServerApp that raises recorded as failed although `flwr run` exits 0. All in one run, to keep the
time down: every deployed message costs a ClientApp process start. The same site behaviour is
also checked in process (fast). What Flower 1.42 does with a killed SuperNode: docs/deploy.md.
Every process is started by the federation and stopped by pid, whatever happens."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Message
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

import sites.app as site_app
from fedmae.checkpoint import load_checkpoint
from fedmae.federated.global_model import GlobalCheckpoints
from fedmae.federated.settings import APP_DIR, experiment_config
from fedmae.federated.site_run import forget_site_runs
from fedmae.federated.simulate import descendants, flower_tool
from server.app import federated_run
from server.inprocess import InProcessGrid
from tests.deploy.loopback import CONNECTION, Loopback, alive
from tests.tiny import tiny_raw

SITES = ("site-0", "site-1")
# One round a pre-training epoch; no fine-tuning: the faults are the same in both phases.
# round_timeout is above the ~60 s after which Flower gives up on a silent SuperNode.
# Separate validation messages: the SuperLink is killed while the sites evaluate round 2's model,
# after it was averaged and before it is checkpointed (with validation taken with the next
# round's training there is no such window).
FAULTS = tiny_raw(2, data={"num_sites": 2, "cases_per_site": 8}, pretrain={"epochs": 3, "warmup_epochs": 1},
                  federated={"min_sites": 1, "round_timeout": 120, "finetune": "none", "validate_with_training": False})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def current(log: list[dict], phase: str = "pretrain") -> list[dict]:
    """The records that stand: a resume line supersedes the earlier records of the rounds after it."""
    kept: list[dict] = []
    for record in log:
        if record.get("phase") == phase and "resumed_after_round" in record:
            kept = [r for r in kept if r.get("phase") != phase or int(r.get("round") or 0) <= record["resumed_after_round"]]
        kept.append(record)
    return [r for r in kept if r.get("phase") == phase and "round" in r]


def training(log: list[dict]) -> list[dict]:
    """Each site's training record per round (not its evaluation's)."""
    return [r for r in log if "status" in r and not r["status"].startswith("evaluation")]


def site_state(state_dir: Path, cfg_name: str, out: Path, site: str, phase: str = "pretrain") -> Path:
    """Where a deployed site keeps its state for the run in ``out`` (see fedmae/federated/site_run.py)."""
    return state_dir / f"{cfg_name}-{hashlib.sha256(str(out).encode()).hexdigest()[:10]}" / site / phase


def wait_for(what: str, condition, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def corrupt(path: Path) -> None:
    """Garbage of the same size in place of a checkpoint (its SHA-256 manifest is left as it was)."""
    size = path.stat().st_size
    path.write_bytes(os.urandom(size))


# ---- in process: the same refusal, without a deployment ----------------------------------------

def in_process_run_config(tmp_path: Path, out: Path) -> dict:
    """The faults' experiment (without the deployment's long round timeout) as run settings."""
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(tiny_raw(2, data={"num_sites": 2, "cases_per_site": 8},
                                                  pretrain={"epochs": 3, "warmup_epochs": 1},
                                                  federated={"min_sites": 1, "finetune": "none"})))
    return {"experiment": str(experiment), "overrides": "", "output-dir": str(out), "resume": False}


def test_a_site_whose_state_file_is_corrupt_refuses_the_rounds_that_need_it(tmp_path, monkeypatch, caplog):
    out, state = tmp_path / "out", tmp_path / "state"
    run_config = in_process_run_config(tmp_path, out)
    grid = InProcessGrid(site_app.app, [{"site": s, "state-dir": str(state / s)} for s in SITES], run_config)
    cfg = experiment_config(run_config)
    victim = site_state(state / "site-0", cfg.name, out, "site-0") / "round_00001.pt"
    original = GlobalCheckpoints.save

    def corrupt_after_round_1(self, phase, server_round, *args, **kwargs):
        path = original(self, phase, server_round, *args, **kwargs)
        if server_round == 1:
            corrupt(victim)
            forget_site_runs()  # as in a deployment, where every message gets a new ClientApp process
        return path

    monkeypatch.setattr(GlobalCheckpoints, "save", corrupt_after_round_1)
    fedmae_log = logging.getLogger("fedmae")  # Flower's console handler only, once a ClientApp ran
    fedmae_log.addHandler(caplog.handler)
    try:
        federated_run(grid, cfg, out, resume=False).run()
    finally:
        fedmae_log.removeHandler(caplog.handler)
    status = {(r["round"], r["site"]): (r["status"], r.get("reason", "")) for r in training(records(out))}
    evaluations = {(r["round"], r["site"]): r["status"] for r in records(out) if r.get("status") == "evaluation failed"}
    # Round 1's validation goes out with round 2's training, after the corruption: site-0 cannot
    # take it either (it needs its decoder after round 1).
    assert evaluations == {(n, "site-0"): "evaluation failed" for n in (1, 2, 3)}
    assert status[(1, "site-0")][0] == status[(1, "site-1")][0] == "ok"
    for server_round in (2, 3):  # refused every round until the file is dealt with; site-1 carries on
        assert status[(server_round, "site-1")][0] == "ok"
        assert status[(server_round, "site-0")][0] == "failed"
        assert "site site-0: its pretrain state after round 1 is unusable" in status[(server_round, "site-0")][1]
        assert "SHA-256 differs" in status[(server_round, "site-0")][1]
    refusals = [r.getMessage() for r in caplog.records if r.name == "fedmae.site"]
    assert refusals and all("\n" not in line and str(victim) in line for line in refusals)
    assert not (victim.parent / "round_00002.pt").exists()  # nothing trained on a wrong state


def test_a_site_flower_reports_unavailable_is_named_and_continues_from_its_saved_state(tmp_path, caplog):
    """A SuperNode that stops answering (killed) gets a reply written by the SuperLink in its place,
    "Node Unavailable", sent from the SuperLink's own node id: the round's record names the site,
    once. At its next round the site continues from its state after the last round it trained."""
    out = tmp_path / "out"
    run_config = in_process_run_config(tmp_path, out)
    grid = InProcessGrid(site_app.app, [{"site": s, "state-dir": str(tmp_path / "state" / s)} for s in SITES], run_config)

    def unavailable_in_round_2(request: Message, reply: Message) -> Message:
        config = request.content["config"]
        if config["phase"] == "pretrain" and int(config["round"]) == 2:
            return create_message_error_unavailable_res_message(request.metadata, "node_unavail")
        return reply

    original = grid.client_app

    def killed_in_round_2(message: Message, context) -> Message:  # it never saves round 2
        config = message.content["config"]
        if config["phase"] == "pretrain" and int(config["round"]) == 2 and context.node_id == 101:
            return Message(message.content, reply_to=message)
        forget_site_runs()  # every message gets a new ClientApp process in a deployment
        return original(message, context)

    grid.client_app = killed_in_round_2
    grid.faults = {101: unavailable_in_round_2}
    fedmae_log = logging.getLogger("fedmae")
    fedmae_log.addHandler(caplog.handler)
    try:
        federated_run(grid, experiment_config(run_config), out, resume=False).run()
    finally:
        fedmae_log.removeHandler(caplog.handler)
    lines = sorted((r["round"], r["site"], r["status"]) for r in records(out) if "status" in r)
    # Round 1's validation went out with round 2's training message, which site-1 did not answer.
    assert lines == [(1, "site-0", "ok"), (1, "site-1", "evaluation failed"), (1, "site-1", "ok"), (2, "site-0", "ok"),
                     (2, "site-1", "failed"), (3, "site-0", "ok"), (3, "site-1", "ok")]
    assert next(r for r in records(out) if r.get("status") == "failed")["reason"].startswith("Error: Node Unavailable")
    state = site_state(tmp_path / "state/site-1", "tiny2d", out, "site-1")
    assert load_checkpoint(state / "round_00003.pt")["step"] == 2 * load_checkpoint(state / "round_00001.pt")["step"]
    assert ("site site-1: pretrain continues from this site's state after round 1: it has none for round(s) 2 "
            "(it missed them)") in caplog.text


# ---- one loopback federation for the process-level faults -----------------------------------------

@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Loopback(tmp_path_factory.mktemp("faults"), keys=SITES)
    started = time.monotonic()
    try:
        fed.start_superlink()
        for site in SITES:
            fed.register(site)
        fed.nodes = {site: fed.start_supernode(site)[0] for site in SITES}
        wait_for("both SuperNodes online", lambda: fed.online_nodes() == len(SITES), 120, every=1.0)
        fed.remember()
        print(f"federation up in {time.monotonic() - started:.0f} s")
        yield fed
    finally:
        fed.stop()
        left = fed.leftovers()
        assert not left, f"processes outlived the fault tests: {left}"


def flwr_run(fed: Loopback, experiment: Path, out: Path, *settings: str, log: str = "flwr-run") -> subprocess.Popen:
    config = " ".join((f'experiment="{experiment}"', f'output-dir="{out}"', *settings))
    return fed.start(log, [flower_tool("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", config])[0]


def clientapps(node: subprocess.Popen) -> set[int]:
    found = set()
    for pid in descendants(node.pid):
        try:
            if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            pass
    return found


def is_serverapp(pid: int) -> bool:
    try:
        return b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def reference_run(tmp_path: Path, experiment: Path, fails: dict[int, int]) -> dict[str, torch.Tensor]:
    """The same experiment in process, uninterrupted, with the sites failing the training rounds in
    ``fails`` (node index -> round) as they did in the deployment; the final global model."""
    out = tmp_path / "reference"
    run_config = {"experiment": str(experiment), "overrides": "", "output-dir": str(out), "resume": False}
    grid = InProcessGrid(site_app.app, [{"site": s, "state-dir": str(tmp_path / "ref-state" / s)} for s in SITES],
                         run_config)

    def fails_train_round(server_round: int):
        def crash(request: Message) -> str | None:
            train = request.metadata.message_type == "train"
            return "down" if train and int(request.content["config"]["round"]) == server_round else None
        return crash

    grid.crashes = {100 + index: fails_train_round(server_round) for index, server_round in fails.items()}
    federated_run(grid, experiment_config(run_config), out, resume=False).run()
    return load_checkpoint(out / "global/pretrain_last.pt")["model"]


@pytest.mark.slow
def test_deployment_faults_site_crash_superlink_crash_corrupt_state_and_a_failing_serverapp(federation, tmp_path):
    """Pre-training rounds 1-3 at two sites, on one loopback federation:
    round 2: site-1's SuperNode is killed (SIGKILL) while it trains. Flower gives up on it after
             ~60 s ("Node Unavailable") and the round is averaged without it; the SuperLink is
             killed (SIGKILL) right then, before the round's global model is checkpointed
             (the sites are evaluating it); restarted on its database, site-1 restarted, the run
             resumed with resume=true: round 2 is trained again, by both sites, from their states
             after round 1, and its first records are marked superseded;
    round 3: site-0's state after round 2 was overwritten with garbage: it refuses, in one line.
    The final global model equals an in-process run in which site-0 fails round 3: nothing else
    differs, and nothing was averaged twice. While Flower waits for the killed site, a run whose
    ServerApp raises (min_sites not reached) is recorded as failed although `flwr run` exits 0,
    and the uninterrupted reference is computed."""
    fed = federation
    experiment = tmp_path / "faults.yaml"
    experiment.write_text(yaml.safe_dump(FAULTS))
    cfg = experiment_config({"experiment": str(experiment)})
    out = tmp_path / "out"
    state = {site: site_state(fed.root / "state" / site, cfg.name, out, site) for site in SITES}
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    def mark(name: str) -> None:
        timings[name] = round(time.monotonic() - t0, 1)
        print(f"{timings[name]:7.1f} s  {name}", flush=True)

    def round_closed(server_round: int) -> bool:
        return (out / "rounds.jsonl").exists() and any(
            r.get("round") == server_round and "usable" in r for r in records(out))

    first = flwr_run(fed, experiment, out, log="flwr-run-1")
    # Round 2 starts when round 1's global model is checkpointed; a ClientApp that site-1 starts
    # after that is round 2's training.
    wait_for("round 1's global checkpoint", lambda: (out / "global/pretrain_round_0001.pt.sha256").exists(), 400)
    earlier = clientapps(fed.nodes["site-1"])
    wait_for("site-1 training round 2", lambda: clientapps(fed.nodes["site-1"]) - earlier, 120, every=0.05)
    time.sleep(1.0)
    assert not (state["site-1"] / "round_00002.pt").exists(), "site-1 finished round 2 before it could be killed"
    fed.crash(fed.nodes["site-1"])
    mark("site-1 killed in round 2")

    # Meanwhile: a ServerApp that raises (a third site never comes), and the reference run.
    three = tmp_path / "three-sites.yaml"
    three.write_text(yaml.safe_dump(tiny_raw(2, data={"num_sites": 3, "cases_per_site": 8},
                                             pretrain={"epochs": 1, "warmup_epochs": 0},
                                             federated={"min_sites": 3, "round_timeout": 3, "finetune": "none"})))
    failing = flwr_run(fed, three, tmp_path / "out-failing", log="flwr-run-failing")
    straight = reference_run(tmp_path, experiment, fails={0: 3})
    mark("reference computed")
    assert failing.wait(timeout=300) == 0  # Flower's exit status says nothing about the ServerApp
    failed = json.loads((tmp_path / "out-failing/summary.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"].startswith("RuntimeError: 2 site(s) connected within federated.round_timeout=3 s; "
                                      "federated.min_sites is 3")
    mark("failing run recorded")

    wait_for("round 2 to be averaged without site-1", lambda: round_closed(2), 200, every=0.1)
    fed.crash(fed.superlink)
    mark("round 2 averaged; SuperLink killed")
    assert not (out / "global/pretrain_round_0002.pt").exists(), "round 2 was checkpointed before the SuperLink died"
    first_exit = first.wait(timeout=120)
    # Flower's own exit of the ServerApp can hang on its retry lock (61 s in CI, over 240 s here);
    # fedmae ends it 10 s after its SuperExec died (server/app.py: end_when_orphaned).
    wait_for("the old ServerApp to end", lambda: not [p for p in fed.seen if alive(p) and is_serverapp(p)], 120)
    after_crash = json.loads((out / "summary.json").read_text())
    mark(f"old ServerApp ended; first flwr run exited {first_exit}; summary {after_crash['status']}")
    assert after_crash["status"] == "failed" and after_crash["error"].startswith("stopped from outside while running")
    before_resume = records(out)
    round_2 = {r["site"]: r for r in training(before_resume) if r["round"] == 2}
    assert round_2["site-0"]["status"] == "ok" and round_2["site-1"]["status"] == "failed"
    assert round_2["site-1"]["reason"].startswith("Error: Node Unavailable")

    fed.start_superlink()
    mark("SuperLink restarted")
    site_1_log = fed.root / "site-1.log"
    for attempt in range(1, 21):  # Flower refuses a node it still counts as online; not the case here
        activated = site_1_log.read_text().count("SuperNode ID:")
        node, _ = fed.start_supernode("site-1")
        wait_for("the SuperNode to connect or give up", lambda: node.poll() is not None or
                 site_1_log.read_text().count("SuperNode ID:") > activated, 120)
        if node.poll() is None:
            break
        time.sleep(3.0)
    fed.nodes["site-1"] = node
    wait_for("both SuperNodes online", lambda: fed.online_nodes() == len(SITES), 180, every=1.0)
    mark(f"both sites online (site-1 restarted, attempt {attempt})")
    manifest = state["site-0"] / "round_00002.pt.sha256"
    before = manifest.stat().st_ino
    resumed = flwr_run(fed, experiment, out, "resume=true", log="flwr-run-2")
    # Between rounds 2 and 3: site-0's state after the repeated round 2 is overwritten.
    wait_for("site-0 to train round 2 again", lambda: manifest.exists() and manifest.stat().st_ino != before, 400,
             every=0.05)
    victim = state["site-0"] / "round_00002.pt"
    corrupt(victim)
    mark("site-0's round-2 state corrupted")
    assert resumed.wait(timeout=400) == 0
    mark("resumed run ended")
    fed.remember()
    print(json.dumps(timings))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done", summary.get("error")
    server_log = (fed.root / "flwr-run-2.log").read_text()
    assert "resuming pre-training after round 1 of 3" in server_log
    assert "pretrain: round(s) 2 were under way when the run stopped" in server_log
    log = records(out)
    assert {"phase": "pretrain", "resumed_after_round": 1, "superseded_rounds": [2]} in log
    standing = current(log)
    status = {(r["round"], r["site"]): r for r in training(standing)}
    # Round 2 again, by both sites, each from its state after round 1 (site-1 never saved round 2).
    assert "site site-0: pretrain round 2 is a repeated round" in (fed.root / "site-0.log").read_text()
    per_round = load_checkpoint(state["site-1"] / "round_00002.pt")["step"] // 2
    assert load_checkpoint(state["site-1"] / "round_00003.pt")["step"] == 3 * per_round > 0
    # Corrupt state: site-0 refused round 3, and the evaluations of rounds 2 and 3 (they need its
    # decoder after round 2).
    assert status[(3, "site-0")]["status"] == "failed"
    assert f"its pretrain state after round 2 is unusable ({victim}: SHA-256 differs" in status[(3, "site-0")]["reason"]
    site_0_log = (fed.root / "site-0.log").read_text()
    refusals = [line for line in site_0_log.splitlines() if "is unusable" in line]
    print("site-0 said:", refusals[0])
    assert len(refusals) == 3 and "Traceback" not in site_0_log.split(refusals[0])[1]
    # Nothing averaged twice: one standing record per site and round, one summary line per round
    # whose usable count is that of the ok records; one global checkpoint per round.
    oks = [(r["round"], r["site"]) for r in standing if r.get("status") == "ok"]
    assert sorted(oks) == [(1, "site-0"), (1, "site-1"), (2, "site-0"), (2, "site-1"), (3, "site-1")]
    assert {r["round"]: r["usable"] for r in standing if "usable" in r} == {1: 2, 2: 2, 3: 1}
    assert [load_checkpoint(p)["extra"]["round"] for p in sorted((out / "global").glob("pretrain_round_*.pt"))] == [1, 2, 3]

    deployed = load_checkpoint(out / "global/pretrain_last.pt")["model"]
    difference = max(float((deployed[k] - straight[k]).abs().max()) for k in straight)
    print(f"max abs weight difference, resumed deployment vs uninterrupted: {difference:g}")
    assert all(torch.equal(deployed[k], straight[k]) for k in straight)
