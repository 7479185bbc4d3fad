"""A real deployment on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, two registered
sites running the fedmae app, a site with an unregistered key (refused) and a site that does not
trust the CA (cannot connect). The parts start with the scripts docs/deploy.md tells hospital IT to
use. Every process is started here and stopped here, whatever happens."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fedmae.deploy import pki
from fedmae.federated.settings import APP_DIR
from fedmae.federated.simulate import descendants, flower_tool, free_port, stop_process_tree
from tests.federated.test_simulation import flower_processes
from tests.tiny import tiny_raw

CONNECTION = "fedmae-loopback"


def wait_until_healthy(port: int, ca: Path, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the SuperLink exited: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the SuperLink did not become healthy: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_tls_authenticated_two_site_run_and_both_refusals(tmp_path):
    before = flower_processes()
    creds = tmp_path / "pki"
    pki.create_ca(creds / "ca")
    pki.issue_server_certificate(creds / "ca", creds / "server", ["localhost", "127.0.0.1"])
    for site in ("site-0", "site-1", "rogue"):
        pki.create_site_keys(creds / "sites", site)
    pki.create_ca(creds / "other-ca", common_name="not the federation's CA")
    port = free_port()
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "FEDMAE_HOST": "127.0.0.1"}
    added = subprocess.run([str(APP_DIR / "server/add-connection.sh"), CONNECTION, f"127.0.0.1:{port}",
                            str(creds / "ca/ca.crt")], env=env, capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(tiny_raw(2, data={"num_sites": 2, "cases_per_site": 8},
                                                  # One round a phase: every round of a deployment pays
                                                  # Flower's 3 s reply polling and a ClientApp process
                                                  # start per message; rounds are tested in process.
                                                  pretrain={"epochs": 1, "warmup_epochs": 0},
                                                  finetune={"epochs": 1, "warmup_epochs": 0},
                                                  federated={"min_sites": 2, "round_timeout": 120})))
    processes: list[subprocess.Popen] = []
    seen: set[int] = set()  # every child seen: a SuperNode that gives up leaves its SuperExec behind

    def remember() -> None:
        for process in processes:
            seen.update(descendants(process.pid))

    def start(name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path,
                                   start_new_session=True)
        processes.append(process)
        return process, log

    def supernode(site: str, ca: Path, *extra: str) -> list[str]:
        return [str(APP_DIR / "sites/start-supernode.sh"), "--superlink", f"127.0.0.1:{port}", "--ca", str(ca),
                "--key", str(creds / f"sites/{site}.key"), "--site", site, "--state", str(tmp_path / "state" / site),
                "--port", str(free_port()), "--", "--health-server-address", f"127.0.0.1:{free_port()}", *extra]

    try:
        superlink, superlink_log = start("superlink", [
            str(APP_DIR / "server/start-superlink.sh"), str(creds), str(tmp_path / "superlink-state"), str(port),
            "--health-server-address", f"127.0.0.1:{free_port()}"])
        wait_until_healthy(port, creds / "ca/ca.crt", superlink, superlink_log)
        for site in ("site-0", "site-1"):
            registered = subprocess.run([flower_tool("flwr"), "supernode", "register", str(creds / f"sites/{site}.pub"), CONNECTION],
                                        env=env, capture_output=True, text=True, timeout=60)
            assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered.stdout
        for site in ("site-0", "site-1"):
            start(site, supernode(site, creds / "ca/ca.crt"))
        rogue, rogue_log = start("rogue", supernode("rogue", creds / "ca/ca.crt", "--max-retries", "3"))
        untrusted, untrusted_log = start("untrusted", supernode("site-0", creds / "other-ca/ca.crt", "--max-retries", "2"))
        time.sleep(3.0)  # each SuperNode starts its SuperExec at once
        remember()

        remember()
        run = subprocess.run(
            [flower_tool("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config",
             f'experiment="{experiment}" output-dir="{tmp_path / "out"}"'],
            env=env, capture_output=True, text=True, timeout=500)
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
        remember()
        for process in reversed(processes):
            stop_process_tree(process, also=seen)
    assert flower_processes() == before, "a Flower process outlived the deployment test"
