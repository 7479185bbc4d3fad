"""Output folders are safe: a run claims its folder, refuses what is not its own in one line
before anything is written, and `--force` says what it replaces. The CLI runs in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmae.engine.runs import MARKER
from tests.command_line import fedmae, write_config
from tests.tiny import tiny_config, tiny_raw


LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def one_epoch_config(folder: Path, **sections) -> Path:
    return write_config(folder, tiny_raw(pretrain={"epochs": 1, "warmup_epochs": 0},
                                         finetune={"epochs": 1, "warmup_epochs": 0}, **sections))


def run(folder: Path, *args: str) -> tuple[int, str]:
    """The exit status and the command's own lines on stderr: not fedmae's log lines (a simulate
    checks its data, and says so, before it counts the sites)."""
    result = fedmae(*args, cwd=folder)
    return result.returncode, "\n".join(line for line in result.stderr.strip().splitlines() if not LOG_LINE.match(line))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_that_is_not_a_fedmae_run_is_refused_and_untouched(tmp_path):
    cfg = one_epoch_config(tmp_path)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "important.txt").write_text("do not lose me")
    (user / "config.yaml").write_text("my own settings\n")
    before = snapshot(user)
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(user))
    assert status == 2 and len(err.splitlines()) == 1
    assert "not a fedmae run" in err and "--force" in err and str(user) in err
    assert snapshot(user) == before

    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(user), "--force")
    assert status == 0
    assert (user / "important.txt").read_text() == "do not lose me"  # --force replaces the run's files only
    assert json.loads((user / MARKER).read_text())["command"] == "pretrain"
    assert (user / "checkpoint_last.pt").is_file()


@pytest.mark.parametrize("make, words", [
    (lambda p: (p / "afile").write_text("x") and p / "afile", "is a file, not a folder"),
    (lambda p: (p / "afile").write_text("x") and p / "afile" / "sub", "is a file, not a folder"),
    (lambda p: Path("/proc/fedmae-x"), "cannot write in /proc"),
])
def test_impossible_output_paths_are_one_line_before_the_data_checks(tmp_path, make, words):
    # Data that do not exist: the output path must be refused before the data are looked at.
    cfg = one_epoch_config(tmp_path, data={"source": "nifti_folder", "root": str(tmp_path / "missing")})
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(make(tmp_path)))
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err


def test_a_refused_resume_writes_nothing(tmp_path):
    cfg = one_epoch_config(tmp_path)
    out = tmp_path / "run"
    assert run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out))[0] == 0
    before = snapshot(out)
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out), "--resume",
                      "--set", "pretrain.base_lr=0.5")
    assert status == 2 and "cannot resume" in err and "pretrain.base_lr" in err
    assert snapshot(out) == before  # config.yaml still records the run its checkpoint holds
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out))
    assert status == 2 and "--resume" in err and "--force" in err
    assert snapshot(out) == before


def test_a_resume_may_change_where_and_how_often_things_are_written(tmp_path):
    # Checkpoint cadence and tracking change no weight: a resumed run may change them.
    cfg = one_epoch_config(tmp_path)
    out = tmp_path / "run"
    assert run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out))[0] == 0
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out), "--resume",
                      "--set", "pretrain.checkpoint_every=5", "--set", "tracking.run_name=renamed")
    assert status == 0, err


def test_a_run_of_another_command_or_experiment_is_refused(tmp_path):
    cfg = one_epoch_config(tmp_path)
    out = tmp_path / "run"
    assert run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out))[0] == 0
    before = snapshot(out)
    status, err = run(tmp_path, "finetune", "--config", str(cfg), "--output", str(out))
    assert status == 2 and "holds the pretrain run" in err
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out), "--set", "name=other")
    assert status == 2 and "experiment 'tiny2d'" in err
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out), "--force", "--resume")
    assert status == 2 and "pass one of them" in err
    assert snapshot(out) == before


def test_force_starts_a_run_over_without_its_old_checkpoint(tmp_path, caplog):
    cfg = one_epoch_config(tmp_path)
    out = tmp_path / "run"
    assert run(tmp_path, "finetune", "--config", str(cfg), "--output", str(out))[0] == 0
    (out / "notes.txt").write_text("kept")
    old = (out / "checkpoint_last.pt").read_bytes()
    status, _ = run(tmp_path, "finetune", "--config", str(cfg), "--output", str(out), "--force", "--set", "seed=1")
    assert status == 0
    assert "--force" in caplog.text and "checkpoint_last.pt" in caplog.text  # says what it replaced
    assert (out / "notes.txt").read_text() == "kept"
    assert (out / "checkpoint_last.pt").read_bytes() != old
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1


def test_an_unusable_device_writes_nothing(tmp_path):
    cfg = one_epoch_config(tmp_path)
    out = tmp_path / "run"
    status, err = run(tmp_path, "pretrain", "--config", str(cfg), "--output", str(out), "--set", "device=cuda:7")
    assert status == 2 and len(err.splitlines()) == 1 and "device" in err
    assert not out.exists()


def test_evaluate_writes_next_to_the_checkpoint_as_its_help_says(tmp_path):
    cfg = one_epoch_config(tmp_path)
    out = tmp_path / "ft"
    assert run(tmp_path, "finetune", "--config", str(cfg), "--output", str(out))[0] == 0
    assert run(tmp_path, "evaluate", "--config", str(cfg), "--checkpoint", str(out / "checkpoint_best.pt"))[0] == 0
    assert (out / "evaluation_test.json").is_file()
    shown = fedmae("evaluate", "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "default: the checkpoint's folder" in " ".join(shown.stdout.split())


def test_version(tmp_path):
    version = fedmae("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("fedmae ")


def test_impossible_federation_settings_are_refused_before_flower_starts(tmp_path, monkeypatch):
    import fedmae.federated.simulate as simulation

    monkeypatch.setattr(simulation.subprocess, "Popen", None)  # starting any process would fail loudly
    cfg = one_epoch_config(tmp_path)
    out = tmp_path / "fed"
    status, err = run(tmp_path, "simulate", "--config", str(cfg), "--output", str(out), "--set", "federated.min_sites=5")
    assert status == 2 and len(err.splitlines()) == 1
    assert "federated.min_sites: 5" in err and "2 site(s)" in err
    assert not out.exists()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("x")
    status, err = run(tmp_path, "simulate", "--config", str(cfg), "--output", str(user))
    assert status == 2 and "not a fedmae run" in err


HOLDER = """
import sys, time
from pathlib import Path
from fedmae.engine.runs import hold_output_dir
held = hold_output_dir(Path(sys.argv[1]), "output-dir")
print("held", flush=True)
time.sleep(600)
"""


def test_one_run_writes_into_a_folder_at_a_time_and_a_killed_one_lets_go(tmp_path):
    """A federated run holds its folder while it writes: a second run on it (a resume started
    while a ServerApp whose SuperLink died is still ending) is refused in one line naming the
    holder, and writes nothing; `simulate --force` does not clear it. The kernel lets go of the
    folder when the holder dies, even by SIGKILL; a run that ended lets go too."""
    from fedmae.engine.runs import OutputError
    from fedmae.federated.federation import FederatedRun

    cfg_path = one_epoch_config(tmp_path)
    cfg = tiny_config(pretrain={"epochs": 1, "warmup_epochs": 0}, finetune={"epochs": 1, "warmup_epochs": 0})
    out = tmp_path / "fed"
    FederatedRun(None, cfg, out, resume=False).folder.release()  # claimed, as a run that started
    (out / "rounds.jsonl").write_text("{}\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        with pytest.raises(OutputError) as refused:
            FederatedRun(None, cfg, out, resume=True)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"output-dir {out}: another fedmae run is writing into it")
        assert f"pid {holder.pid} on " in message
        status, err = run(tmp_path, "simulate", "--config", str(cfg_path), "--output", str(out), "--force")
        assert status == 2 and "another fedmae run is writing into it" in err
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    FederatedRun(None, cfg, out, resume=True).folder.release()  # free again
    run_ = FederatedRun(None, cfg, out, resume=True)
    with pytest.raises(AttributeError):  # no sites: the run fails at once, and lets go of the folder
        run_.run()
    FederatedRun(None, cfg, out, resume=True).folder.release()


@pytest.mark.parametrize("command, advice", [("compare", "a rerun resumes"), ("pretrain", "with --resume")])
def test_the_interrupt_message_gives_advice_that_works(tmp_path, monkeypatch, command, advice):
    import fedmae.comparison.run
    import fedmae.engine.pretrain

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedmae.comparison.run, "run_comparison", interrupted)
    monkeypatch.setattr(fedmae.engine.pretrain, "pretrain", interrupted)
    status, err = run(tmp_path, command, "--config", str(one_epoch_config(tmp_path)), "--output", str(tmp_path / "x"))
    assert status == 130 and advice in err
