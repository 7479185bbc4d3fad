"""Stop what `fedmae simulate` started when the fedmae process dies without cleaning up.

`simulate()` stops the Flower SuperLink and everything below it (SuperExec, the simulation
process, Ray's raylet, GCS, workers and actors) in a ``finally`` block, which runs on a normal
exit, an exception, Ctrl-C and SIGTERM. It does not run when the process is killed with SIGKILL
or by the OOM killer, and those processes do not die with it: the SuperLink runs in a session of
its own (so Ctrl-C reaches only fedmae, which then stops it in order), the simulation process
starts another one, and Ray's processes have their own. The run would carry on unwatched, holding
the cores and memory, and the private FLWR_HOME folder would stay.

So `simulate()` starts this watchdog beside the SuperLink::

    python -m fedmae.federated.watchdog --parent PID --root SUPERLINK_PID --home FLWR_HOME

in a session of its own (a signal to fedmae's process group, or the terminal's, does not reach
it). It polls twice a second. While fedmae lives it records the SuperLink's process tree: once a
process exits its children are re-parented (to init) and can no longer be found from the root, so
the tree must be known before anything dies. When fedmae is gone it stops the recorded tree
(SIGTERM, a short grace, SIGKILL), removes FLWR_HOME and exits. When the run ends normally fedmae
stops it (last, so that a kill during fedmae's own cleanup is still covered); it also exits by
itself once nothing it watches is running.

fedmae's liveness is ``os.getppid()``: the watchdog is fedmae's child, and when fedmae dies it is
re-parented, so its parent pid changes. Unlike polling fedmae's pid this cannot be fooled by the
pid being reused. Process-tree helpers (`descendants`, `stop_pids`) live here, not in
`simulate.py`, so that this module imports nothing heavy (no torch): it starts in a fraction of a
second and holds a few MB while the run uses the rest.

Linux and macOS (``ps``; the parent-death signal for `flwr run` is Linux only).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

POLL_INTERVAL = 0.5
# A run killed hard is lost anyway; SIGTERM first lets Ray's raylet release its shared memory.
STOP_GRACE = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def watch(parent: int, root: int, home: Path | None, interval: float = POLL_INTERVAL,
          grace: float = STOP_GRACE) -> bool:
    """Watch until ``parent`` dies (then stop ``root``'s recorded tree, remove ``home``: True) or
    nothing under ``root`` runs any more (False). Must run in a child of ``parent``."""
    tracked = {root}
    while True:
        parent_gone = os.getppid() != parent  # checked before recording, so the tree is complete
        # Forget what has exited (its pid could be reused by an unrelated process), then add what
        # the live ones have started; a re-parented process's subtree is still found from it.
        tracked = {pid for pid in tracked if alive(pid)}
        if tracked:
            tracked.update(descendants(*tracked))
        if parent_gone:
            break
        if not tracked:
            return False
        time.sleep(interval)
    print(f"fedmae watchdog: process {parent} is gone; stopping the {len(tracked)} Flower/Ray processes it "
          f"started{f' and removing {home}' if home else ''}", file=sys.stderr, flush=True)
    stop_pids(sorted(tracked), grace=grace)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
    return True


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when the thread that started
    it exits (PR_SET_PDEATHSIG), or None where that is not available (not Linux). For direct
    children that start nothing of their own (`flwr run`): a child's children are not covered."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return set_signal


def stop_pids(pids: list[int], grace: float = 15.0) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL what is still running."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    _wait_gone(pids, grace, every=0.2)
    killed = [pid for pid in pids if alive(pid)]  # only what is still running: a dead pid may have been reused
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    _wait_gone(killed, 5.0, every=0.05)  # gone (reaped) before this returns, so nothing is seen still running


def _wait_gone(pids: list[int], seconds: float, every: float) -> None:
    """Up to ``seconds`` for every one of ``pids`` to have exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(every)


def descendants(*roots: int) -> list[int]:
    """The processes below ``roots`` (children, their children, ...), from one ``ps`` listing."""
    listing = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(fields[0]))
    found, seen, stack = [], set(roots), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                found.append(child)
                stack.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie (exited, not yet reaped) still answers signal 0 but holds nothing.
    status = Path(f"/proc/{pid}/stat")
    try:
        return not (status.is_file() and ") Z" in status.read_text())
    except OSError:  # exited between the two checks
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmae.federated.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="the fedmae process (this watchdog's parent)")
    parser.add_argument("--root", type=int, required=True, help="the process whose tree to stop (the SuperLink)")
    parser.add_argument("--home", type=Path, help="a folder to remove once the tree is stopped (FLWR_HOME)")
    args = parser.parse_args(argv)
    # Ctrl-C in fedmae's terminal is fedmae's to handle (it stops the run, then this watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(args.parent, args.root, args.home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
