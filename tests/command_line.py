"""Running the ``fedmae`` command in tests, and checking what it leaves running.

``fedmae(...)`` calls ``fedmae.cli.main`` in this process: the exit status, stdout and stderr a
test checks, without the ~10 s torch/MONAI/Flower import every new process pays on CI.
``fedmae_console_script(...)`` starts the installed console script, for the tests whose point is
the separate process.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml

from fedmae.cli import main

# What fedmae.cli.main's logging.basicConfig gives a new process; it adds nothing under pytest,
# whose handlers are already on the root logger.
LOG_FORMAT, LOG_DATE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"

FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-simulation", "flwr-serverapp",
                    "flwr-clientapp", "raylet", "gcs_server")


def fedmae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``fedmae ARGS`` in ``cwd``, in this process: stderr holds what a process would print there
    (the error line, fedmae's log lines, warnings). An uncaught exception propagates with its
    traceback, where a process would print it and exit 1. Output of the processes the command
    starts (Flower's) is not in stdout/stderr: pytest captures it."""
    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    console = logging.StreamHandler(stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    here = os.getcwd()
    try:
        os.chdir(cwd)
        root.addHandler(console)  # before main: its basicConfig then adds no second one
        root.setLevel(logging.INFO)
        with redirect_stdout(stdout), redirect_stderr(stderr), warnings.catch_warnings(record=True) as caught:
            _fresh_interpreter_warning_filters()
            status = _exit_status(list(args))
        for w in caught:
            stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        os.chdir(here)
        root.handlers[:] = saved_handlers  # also drops any handler the call added
        root.setLevel(saved_level)
    return subprocess.CompletedProcess(["fedmae", *args], status, stdout.getvalue(), stderr.getvalue())


def _exit_status(argv: list[str]) -> int:
    """``sys.exit(main(argv))`` as the interpreter turns it into an exit status."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse: --help, --version, usage errors
        code = stop.code
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _fresh_interpreter_warning_filters() -> None:
    # Python's defaults, not pytest's: what a user of the console script would see once.
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=hidden)


def fedmae_console_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``fedmae ARGS`` in ``cwd`` as a new process of the installed console script."""
    exe = shutil.which("fedmae")
    command = [exe] if exe else [sys.executable, "-m", "fedmae.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def write_config(folder: Path, raw: dict) -> Path:
    """``raw`` as ``folder/experiment.yaml``."""
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def flower_processes() -> list[str]:
    """Live Flower / Ray processes. Exited ones that the container's init has not reaped yet
    ("<defunct>" zombies, reparented to PID 1) hold nothing and are not counted."""
    lines = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in lines if any(name in line for name in FLOWER_PROCESSES) and "<defunct>" not in line]
