"""Checkpoints: atomic writes, self-description, no unpickling of arbitrary objects."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import subprocess
import warnings

import pytest
import torch

from fedmae.checkpoint import CheckpointError, digest_path, load_checkpoint, load_encoder_checkpoint, save_checkpoint


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
    with pytest.raises(CheckpointError, match=r"not a readable fedmae checkpoint \(it holds a pickled Python object "
                                              r"\(posix.system\)") as info:
        load_checkpoint(path)
    assert not os.path.exists(marker)
    assert not any(advice in str(info.value) for advice in UNSAFE_ADVICE)


UNSAFE_ADVICE = ("weights_only", "allow_pickle", "add_safe_globals", "trust")


UNUSABLE = [
    (None, "checkpoint file not found"),
    (b"", "not a readable fedmae checkpoint (the file is empty)"),
    (bytes(range(256)) * 8, "not a readable fedmae checkpoint (not a PyTorch file"),
    (pickle.dumps({"model": {"w": [1.0]}}), "not a readable fedmae checkpoint (not a PyTorch file"),
    (pickle.dumps({"format": "fedmae-checkpoint", "model": argparse.Namespace()}, protocol=2),
     "it holds a pickled Python object (argparse.Namespace)"),
    ("truncated", "SHA-256 differs from c.pt.sha256"),
    ("truncated, no manifest", "not a readable fedmae checkpoint"),
    ("foreign", "not a fedmae checkpoint"),
]
UNUSABLE_IDS = ["missing", "empty", "random-bytes", "plain-pickle", "pickled-object", "truncated",
                "truncated-no-manifest", "foreign"]


@pytest.mark.parametrize("content,words", UNUSABLE, ids=UNUSABLE_IDS)
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
    with pytest.raises(CheckpointError) as info, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        load_checkpoint(path)
    assert not warned, [str(w.message) for w in warned]  # a warning would be more lines on stderr
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not any(advice in str(info.value) for advice in UNSAFE_ADVICE), str(info.value)


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



ENCODER = {"encoder.w": torch.ones(2), "decoder.w": torch.zeros(2)}


@pytest.mark.parametrize("kind,extra,words", [
    ("mae", {}, "an MAE pre-training checkpoint (epoch 1); its decoder is not used"),
    ("global", {"phase": "pretrain", "round": 4}, "a federated pre-trained global model (round 4); its decoder"),
    ("finetune", {"task": {"type": "segmentation", "class_names": ["background", "liver"]}},
     "a fine-tuned model (task segmentation: background, liver, epoch 1); its task head is not used"),
    ("global", {"phase": "finetune", "round": 2}, "a federated fine-tuned global model (round 2); its task head"),
])
def test_an_encoder_is_taken_from_pretraining_and_finetuned_checkpoints_with_one_line(tmp_path, caplog, kind, extra,
                                                                                      words):
    path = save_small(tmp_path / "c.pt", kind=kind, model_state=ENCODER, extra=extra)
    with caplog.at_level(logging.INFO, logger="fedmae.checkpoint"):
        payload = load_encoder_checkpoint(path)
    assert payload["kind"] == kind
    (line,) = [r.getMessage() for r in caplog.records if "using only the encoder" in r.getMessage()]
    assert line == f"using only the encoder of {path}: {words}" or words in line, line


@pytest.mark.parametrize("kind,state,words", [
    ("site", ENCODER, "a site's own state between rounds (site site-0, pretrain), not an encoder to start from"),
    ("other", ENCODER, "a 'other' checkpoint, not one with an encoder to start from"),
    ("mae", {"decoder.w": torch.zeros(2)}, "holds no encoder weights"),
])
def test_checkpoints_without_a_usable_encoder_are_refused_in_one_line(tmp_path, kind, state, words):
    path = save_small(tmp_path / "c.pt", kind=kind, model_state=state, extra={"site": "site-0", "phase": "pretrain"})
    with pytest.raises(CheckpointError) as info:
        load_encoder_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and words in str(info.value) and "\n" not in str(info.value)
