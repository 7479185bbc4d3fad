"""A real deployment on 127.0.0.1 for tests: credentials from `fedmae pki`, a SuperLink with TLS and
SuperNode authentication started with `server/start-superlink.sh`, a `flwr` connection written by
`server/add-connection.sh`, registered sites started with `sites/start-supernode.sh`. Every
process is started by a `Loopback` and stopped by it, by pid (`stop`), whatever happens."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fedmae.deploy import pki
from fedmae.federated.settings import APP_DIR
from fedmae.federated.simulate import descendants, flower_tool, free_port, stop_process_tree

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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # an exited child that nobody reaped yet holds nothing
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


class Loopback:
    """One federation on 127.0.0.1 under ``root``: the CA, the server certificate and one key pair
    per name in ``keys``, a ``FLWR_HOME`` holding the connection, the processes it started."""

    def __init__(self, root: Path, keys: tuple[str, ...] = ("site-0", "site-1")):
        self.root = Path(root)
        self.creds = self.root / "pki"
        pki.create_ca(self.creds / "ca")
        pki.issue_server_certificate(self.creds / "ca", self.creds / "server", ["localhost", "127.0.0.1"])
        for name in keys:
            pki.create_site_keys(self.creds / "sites", name)
        self.ca = self.creds / "ca/ca.crt"
        self.port = free_port()
        self.ports = [self.port]  # every local port handed out: the processes' command lines name them
        self.env = {**os.environ, "FLWR_HOME": str(self.root / "flwr-home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "FEDMAE_HOST": "127.0.0.1"}
        added = subprocess.run([str(APP_DIR / "server/add-connection.sh"), CONNECTION, f"127.0.0.1:{self.port}",
                                str(self.ca)], env=self.env, capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        self.processes: list[subprocess.Popen] = []
        self.seen: set[int] = set()  # every child seen: a process that exits leaves its children behind
        self.superlink: subprocess.Popen | None = None
        self.superlink_log = self.root / "superlink.log"

    def free_port(self) -> int:
        port = free_port()
        self.ports.append(port)
        return port

    def remember(self) -> None:
        # Forget what has exited (its pid could be reused by an unrelated process), add what runs now.
        self.seen = {pid for pid in self.seen if alive(pid)}
        for process in self.processes:
            if process.poll() is None:
                self.seen.update(descendants(process.pid))

    def start(self, name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        """``command`` in its own session, its output (appended) in ROOT/NAME.log."""
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                       start_new_session=True)
        self.processes.append(process)
        return process, log

    def start_superlink(self, *extra: str) -> subprocess.Popen:
        """The SuperLink on its database (ROOT/superlink-state/superlink.db: a restart finds it)."""
        self.superlink, _ = self.start("superlink", [
            str(APP_DIR / "server/start-superlink.sh"), str(self.creds), str(self.root / "superlink-state"),
            str(self.port), "--health-server-address", f"127.0.0.1:{self.free_port()}", *extra])
        wait_until_healthy(self.port, self.ca, self.superlink, self.superlink_log)
        return self.superlink

    def register(self, site: str) -> None:
        done = self.flwr("supernode", "register", str(self.creds / f"sites/{site}.pub"), CONNECTION)
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr

    def supernode_command(self, site: str, ca: Path | None = None, key: str | None = None, *extra: str) -> list[str]:
        return [str(APP_DIR / "sites/start-supernode.sh"), "--superlink", f"127.0.0.1:{self.port}",
                "--ca", str(ca or self.ca), "--key", str(self.creds / f"sites/{key or site}.key"), "--site", site,
                "--state", str(self.root / "state" / site), "--port", str(self.free_port()), "--",
                "--health-server-address", f"127.0.0.1:{self.free_port()}", *extra]

    def start_supernode(self, site: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        return self.start(site, self.supernode_command(site, None, None, *extra))

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flower_tool("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def online_nodes(self) -> int:
        listed = self.flwr("supernode", "list", CONNECTION, "--format", "json", timeout=60)
        try:
            nodes = json.loads(listed.stdout).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for node in nodes if str(node.get("status", "")).lower() == "online")

    def crash(self, process: subprocess.Popen) -> None:
        """SIGKILL, as a crash would: no chance to say goodbye to the SuperLink. Its SuperExec and
        app processes notice their parent is gone and exit (Flower's parent-pid monitor)."""
        self.remember()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        """Every process started here and everything they started, by pid."""
        self.remember()
        for process in reversed(self.processes):
            stop_process_tree(process, also=self.seen)

    def leftovers(self) -> list[str]:
        """Live processes started here, or naming one of this federation's ports."""
        lines = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
        mine = {p.pid for p in self.processes} | self.seen
        found = []
        for line in lines:
            pid, _, args = line.strip().partition(" ")
            flower = any(name in args for name in ("flower-", "flwr-", "flwr "))
            if pid.isdigit() and int(pid) != os.getpid() and alive(int(pid)) and flower and (
                    int(pid) in mine or any(f":{port}" in args for port in self.ports)):
                found.append(line.strip())
        return found
