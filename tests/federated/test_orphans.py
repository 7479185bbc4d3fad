"""`fedmae simulate` killed hard (SIGKILL, as the OOM killer does) leaves nothing running: its
watchdog stops the SuperLink, SuperExec, the simulation process and Ray, and removes FLWR_HOME.
A ServerApp whose starter died ends even when its main thread is blocked."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmae.federated.watchdog import alive, descendants
from tests.command_line import write_config
from tests.tiny import tiny_raw


def run_processes(marker: str) -> set[int]:
    """Live processes whose environment holds ``marker`` (this run's TMPDIR=...): everything the
    run started, also what was re-parented away from its tree."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): a pid reused by another process differs."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def running(seen: dict[int, int]) -> set[int]:
    return {pid for pid, started in seen.items() if alive(pid) and start_time(pid) == started}


def names(pids: set[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {cmdline[:120]}")
        except OSError:
            pass
    return "\n".join(sorted(out))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_simulate_killed_with_sigkill_leaves_no_process_and_no_flower_home(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    marker = f"TMPDIR={tmpdir}".encode()
    # Many one-epoch rounds: the run is still going when it is killed.
    raw = tiny_raw(2, data={"num_sites": 2, "cases_per_site": 8}, pretrain={"epochs": 200, "warmup_epochs": 1},
                   federated={"min_sites": 2, "round_timeout": 300, "local_epochs": 1, "finetune": "none"})
    config = write_config(tmp_path, raw)
    exe = shutil.which("fedmae")
    command = [exe] if exe else [sys.executable, "-m", "fedmae.cli"]
    # Ray's sockets stay under /tmp (a session folder under tmp_path would pass the socket path limit).
    env = {**os.environ, "TMPDIR": str(tmpdir), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    output = (tmp_path / "fedmae.log").open("wb")
    process = subprocess.Popen([*command, "simulate", "--config", str(config), "--output", "fed"], cwd=tmp_path,
                               env=env, stdout=output, stderr=subprocess.STDOUT)
    seen: dict[int, int] = {}  # pid: start time, of every process of the run seen alive
    try:
        expected = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "ray::ClientAppActor",
                    "fedmae.federated.watchdog")
        deadline = time.monotonic() + 240
        while True:  # until the whole tree is up, down to Ray's actors for the sites
            for pid in {*descendants(process.pid), *run_processes(marker)}:
                if pid not in seen and (started_at := start_time(pid)) is not None:
                    seen[pid] = started_at
            started = names(running(seen))
            if all(name in started for name in expected):
                break
            assert process.poll() is None, (tmp_path / "fedmae.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"not all started within 240 s:\n{started}"
            time.sleep(0.5)
        assert len(list(tmpdir.glob("fedmae-flwr-*"))) == 1

        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        while time.monotonic() - killed < 15 and (
                running(seen) | run_processes(marker) or list(tmpdir.glob("fedmae-flwr-*"))):
            time.sleep(0.25)
        left = running(seen) | run_processes(marker)
        assert not left, f"still running 15 s after the kill:\n{names(left)}"
        assert not list(tmpdir.glob("fedmae-flwr-*")), "FLWR_HOME was not removed"
        print(f"everything stopped {time.monotonic() - killed:.1f} s after the kill")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in running(seen) | run_processes(marker):  # never a reused pid: only this run's processes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output.close()


# A ServerApp process whose main thread is blocked, as Flower's is on its retry lock while the
# SuperLink is gone; its parent prints the ServerApp's pid, then sleeps until it is killed.
BLOCKED_SERVERAPP = """
import sys, threading
from pathlib import Path
from server.app import end_when_orphaned

class Run:
    def record_stop(self):
        Path(sys.argv[1]).write_text("stop recorded")

end_when_orphaned(Run(), grace=1.0)
print("watching", flush=True)
blocked = threading.Lock()
blocked.acquire()
blocked.acquire()
"""
STARTER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_serverapp_whose_starter_died_records_the_stop_and_ends_though_its_main_thread_is_blocked(tmp_path):
    record = tmp_path / "stopped"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, BLOCKED_SERVERAPP, str(record)], stdout=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parents[2])
    serverapp = int(starter.stdout.readline())
    try:
        assert starter.stdout.readline().strip() == "watching"
        time.sleep(1.5)
        assert alive(serverapp) and not record.exists()  # its starter lives: it is left alone
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 30
        while alive(serverapp) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(serverapp), "the orphaned ServerApp is still running"
        assert record.read_text() == "stop recorded"
    finally:
        if alive(serverapp):
            os.kill(serverapp, signal.SIGKILL)
