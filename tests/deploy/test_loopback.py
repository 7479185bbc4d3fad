"""A real deployment on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, two registered
sites running the fedmae app, a site with an unregistered key (refused) and a site that does not
trust the CA (cannot connect). The parts start with the scripts docs/deploy.md tells hospital IT to
use. Every process is started here and stopped here, whatever happens. Also the ServerApp's
polling for replies, in process."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import yaml
from flwr.superlink.grid import HttpGrid

from fedmae.deploy import pki
from fedmae.federated.settings import APP_DIR
from tests.command_line import flower_processes
from tests.deploy.loopback import CONNECTION, Loopback
from tests.tiny import tiny_raw


@pytest.mark.slow
def test_tls_authenticated_two_site_run_and_both_refusals(tmp_path):
    before = flower_processes()
    fed = Loopback(tmp_path, keys=("site-0", "site-1", "rogue"))
    creds = fed.creds
    pki.create_ca(creds / "other-ca", common_name="not the federation's CA")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(tiny_raw(2, data={"num_sites": 2, "cases_per_site": 8},
                                                  # One round a phase: every round of a deployment pays
                                                  # Flower's 3 s reply polling and a ClientApp process
                                                  # start per message; rounds are tested in process.
                                                  pretrain={"epochs": 1, "warmup_epochs": 0},
                                                  finetune={"epochs": 1, "warmup_epochs": 0},
                                                  federated={"min_sites": 2, "round_timeout": 120})))
    try:
        fed.start_superlink()
        for site in ("site-0", "site-1"):
            fed.register(site)
        for site in ("site-0", "site-1"):
            fed.start_supernode(site)
        rogue, rogue_log = fed.start("rogue", fed.supernode_command("rogue", None, None, "--max-retries", "3"))
        untrusted, untrusted_log = fed.start("untrusted", fed.supernode_command(
            "site-0", creds / "other-ca/ca.crt", None, "--max-retries", "2"))
        time.sleep(3.0)  # each SuperNode starts its SuperExec at once
        fed.remember()

        fed.remember()
        run = fed.flwr("run", str(APP_DIR), CONNECTION, "--stream", "--run-config",
                       f'experiment="{experiment}" output-dir="{tmp_path / "out"}"', timeout=500)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "sites: site-" in run.stdout + run.stderr  # fedmae's own log lines reach the operator
        summary = json.loads((tmp_path / "out/summary.json").read_text())
        assert set(summary["sites"]) == {"site-0", "site-1"}
        assert set(summary["finetune"]["test"]["sites"]) == {"site-0", "site-1"}
        records = [json.loads(line) for line in (tmp_path / "out/rounds.jsonl").read_text().splitlines()]
        assert {(r["phase"], r["round"], r["site"]) for r in records if r.get("status") == "ok"} == {
            (phase, 1, site) for phase in ("pretrain", "finetune") for site in ("site-0", "site-1")}
        assert (tmp_path / "out/global/pretrain_last.pt.sha256").is_file()

        # The unregistered key is refused by the SuperLink; the site that does not trust the CA
        # cannot complete the TLS handshake. Both give up after their retries.
        assert rogue.wait(timeout=120) != 0 and "Failed to activate SuperNode" in rogue_log.read_text()
        assert untrusted.wait(timeout=120) != 0 and "CERTIFICATE_VERIFY_FAILED" in untrusted_log.read_text()
    finally:
        fed.stop()
    assert flower_processes() == before, "a Flower process outlived the deployment test"


def test_a_deployed_serverapp_looks_for_replies_every_quarter_second_and_keeps_flowers_timeout(monkeypatch):
    """Flower's HttpGrid pauses 3 s between looks for replies; the ServerApp's pauses 0.25 s, and
    otherwise behaves as Flower's: every reply collected, the wait ends at the last reply or at the
    timeout. A Grid that is not Flower's deployed one (the simulation's) is left as it is."""
    import server.app as server_app

    class Replies(HttpGrid):
        def __init__(self, replies_after_looks: dict[str, int]):  # message id -> the look that finds its reply
            self.after, self.looks = replies_after_looks, 0

        def push_messages(self, messages):
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, message_ids):
            self.looks += 1
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                    for i in message_ids if self.after[i] == self.looks]

    pauses: list[float] = []
    monkeypatch.setattr(server_app.time, "sleep", pauses.append)
    messages = [SimpleNamespace(metadata=SimpleNamespace(message_id=i)) for i in ("a", "b")]
    grid = Replies({"a": 2, "b": 5})
    server_app.poll_replies_often(grid)
    replies = grid.send_and_receive(messages, timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert grid.looks == 5 and pauses == [0.25] * 4  # no pause after the last reply
    never = Replies({"a": 99})
    server_app.poll_replies_often(never)
    assert never.send_and_receive(messages[:1], timeout=0) == [] and never.looks == 0  # Flower's: no wait at all
    simulated = SimpleNamespace(send_and_receive="Flower's")
    server_app.poll_replies_often(simulated)
    assert simulated.send_and_receive == "Flower's"
