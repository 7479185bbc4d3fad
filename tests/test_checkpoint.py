"""Checkpoints: atomic writes, self-description, no unpickling of arbitrary objects."""

from __future__ import annotations

import os
import pickle
import subprocess

import pytest
import torch

from fedmae.checkpoint import CheckpointError, digest_path, load_checkpoint, save_checkpoint


def save_small(path, **kwargs):
    defaults = dict(kind="mae", model_state={"w": torch.arange(4.0)}, config={"name": "x"}, epoch=1, step=3)
    return save_checkpoint(path, **{**defaults, **kwargs})


def test_round_trip_carries_config_versions_and_progress(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    path = save_small(tmp_path / "c.pt", optimizer_state=optimizer.state_dict(), metrics={"loss": 0.5})
    payload = load_checkpoint(path, expect_kind="mae")
    assert torch.equal(payload["model"]["w"], torch.arange(4.0))
    assert payload["config"] == {"name": "x"} and payload["epoch"] == 1 and payload["step"] == 3
    assert {"torch", "timm", "monai", "python", "fedmae"} <= set(payload["versions"])
    assert payload["metrics"]["loss"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]  # no temporary file left behind


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_small(tmp_path / "c.pt")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_small(path, epoch=2)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fedmae-pwned",))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "fedmae-checkpoint", "payload": _Exploit()}, path, pickle_module=pickle)
    marker = "/tmp/fedmae-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(CheckpointError, match="not a readable fedmae checkpoint"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("content,words", [
    (None, "checkpoint file not found"),
    (b"", "not a readable fedmae checkpoint"),
    ("truncated", "SHA-256 differs from c.pt.sha256"),
    ("truncated, no manifest", "not a readable fedmae checkpoint"),
    ("foreign", "not a fedmae checkpoint"),
])
def test_unusable_files_give_one_line(tmp_path, content, words):
    path = tmp_path / "c.pt"
    if isinstance(content, str) and content.startswith("truncated"):
        save_small(path)
        path.write_bytes(path.read_bytes()[:200])
        if content.endswith("no manifest"):
            digest_path(path).unlink()
    elif content == "foreign":
        torch.save({"state_dict": {}}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_wrong_kind_is_refused(tmp_path):
    path = save_small(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="expected a finetune checkpoint"):
        load_checkpoint(path, expect_kind="finetune")


def test_an_altered_checkpoint_is_refused_and_the_manifest_is_sha256sum_format(tmp_path):
    path = save_small(tmp_path / "c.pt")
    check = subprocess.run(["sha256sum", "-c", "c.pt.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0 and "c.pt: OK" in check.stdout
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: torch might still load it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.pt: SHA-256 differs from c.pt.sha256"):
        load_checkpoint(path)

