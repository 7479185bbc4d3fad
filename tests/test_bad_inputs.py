"""Bad inputs through the ``fedmae`` command (in-process): exit status 2 and one true line on stderr.

Each row is a mistake a user makes (an empty or doubled YAML, a mistyped ``--set``, a value that
only fails through another, a file that is not what it was given as) and the words the single
``fedmae: error:`` line must hold. None of them may repeat a library's advice to load a file
unsafely, and none writes anything.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.command_line import fedmae
from tests.tiny import tiny_raw

UNSAFE_ADVICE = ("weights_only", "allow_pickle", "add_safe_globals", "trust")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fedmae-bad-inputs-pwned",))


def _yaml(text: str):
    return lambda tmp: (tmp / "experiment.yaml").write_text(text)


def _raw(raw: dict):
    return lambda tmp: (tmp / "experiment.yaml").write_text(yaml.safe_dump(raw))


def _segmentation_depth_2(tmp: Path) -> None:
    raw = tiny_raw(2, "segmentation")
    raw["model"]["depth"] = 2
    _raw(raw)(tmp)


def _random_bytes(name: str):
    return lambda tmp: (tmp / name).write_bytes(np.random.default_rng(0).bytes(4096))


def _pickled_object(tmp: Path) -> None:
    torch.save({"format": "fedmae-checkpoint", "payload": _Exploit()}, tmp / "evil.pt", pickle_module=pickle)


def _object_npz(tmp: Path) -> None:
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, {"b": 2}]
    np.savez(tmp / "pathmnist.npz", **{f"{split}_{kind}": objects for split in ("train", "val", "test")
                                       for kind in ("images", "labels")})


def _both(*makers):
    def make(tmp: Path) -> None:
        for maker in makers:
            maker(tmp)
    return make


TINY = _raw(tiny_raw(2))
TRAIN = ["pretrain", "--config", "experiment.yaml", "--output", "out"]

# (id, files to write, argv, words the one error line holds, words it must not hold)
CASES = [
    ("empty-file", _yaml(""), TRAIN, ["experiment.yaml: the file is empty", "configs/"], []),
    ("only-comments", _yaml("# pretrain:\n#   epochs: 3\n\n"), TRAIN, ["experiment.yaml: the file is empty"], []),
    ("duplicate-section", _yaml("pretrain:\n  epochs: 3\nmodel:\n  depth: 4\npretrain:\n  batch_size: 4\n"), TRAIN,
     ["experiment.yaml: 'pretrain' is given twice (lines 1 and 5)"], []),
    ("duplicate-key", _yaml("pretrain:\n  epochs: 3\n  warmup_epochs: 1\n  epochs: 30\n"), TRAIN,
     ["experiment.yaml: 'pretrain.epochs' is given twice (lines 2 and 4)"], []),
    ("set-unknown-key", TINY, [*TRAIN, "--set", "pretrain.epoks=3"],
     ["--set pretrain.epoks=3: unknown key 'pretrain.epoks'", "epochs"], ["experiment.yaml"]),
    ("set-bad-value", TINY, [*TRAIN, "--set", "pretrain.epochs=abc"],
     ["--set pretrain.epochs=abc: pretrain.epochs: expected an integer, got 'abc'"], ["experiment.yaml"]),
    ("set-impossible-value", TINY, [*TRAIN, "--set", "pretrain.warmup_epochs=9"],
     ["--set pretrain.warmup_epochs=9: pretrain.warmup_epochs: must be between 0 and epochs (3)"], ["experiment.yaml"]),
    ("set-not-a-section", TINY, [*TRAIN, "--set", "seed.x=1"], ["--set seed.x=1: seed is not a section"], []),
    ("depth-for-derived-skips", _segmentation_depth_2, TRAIN,
     ["model.depth: 2 is too shallow for UNETR's skip connections", "needs depth >= 3", "or set model.skip_blocks"],
     ["model.skip_blocks: "]),
    ("set-depth-for-derived-skips", _raw(tiny_raw(2, "segmentation")), [*TRAIN, "--set", "model.depth=2"],
     ["--set model.depth=2: model.depth: 2 is too shallow"], ["experiment.yaml"]),
    ("epochs-under-default-warmup", _raw({"pretrain": {"epochs": 5}}), TRAIN,
     ["pretrain.epochs: 5 is fewer than the default pretrain.warmup_epochs (10)", "set pretrain.warmup_epochs"],
     ["pretrain.warmup_epochs: must"]),
    ("width-with-named-heads", _raw({"model": {"embed_dim": 100}}), TRAIN,
     ["model.embed_dim: 100 is not divisible by vit_tiny_patch16_2d's 3 heads", "set model.num_heads"], []),
    ("img-size-under-default-mask", _raw({"model": {"name": "vit_tiny_patch16_2d", "img_size": [16, 16]},
                                          "data": {"image_size": [16, 16]}}), TRAIN,
     ["model.img_size: [16, 16] makes only 1 patch(es)", "default model.mask_ratio 0.75"], ["model.mask_ratio:"]),
    ("img-size-for-generated-images", _raw({"model": {"name": "vit_tiny_patch4_2d", "img_size": [8, 8]}}), TRAIN,
     ["model.img_size: the built-in generator makes images of model.img_size", "set data.image_size"], []),
    ("val-fraction-with-default-test", _raw({"data": {"val_fraction": 0.7}}), TRAIN,
     ["data.val_fraction: val_fraction 0.7 + test_fraction 0.25"], []),
    ("random-bytes-encoder", _both(TINY, _random_bytes("junk.pt")),
     ["finetune", "--config", "experiment.yaml", "--encoder", "junk.pt", "--output", "out"],
     ["junk.pt: not a readable fedmae checkpoint (not a PyTorch file"], []),
    ("pickled-object-encoder", _both(TINY, _pickled_object),
     ["finetune", "--config", "experiment.yaml", "--encoder", "evil.pt", "--output", "out"],
     ["evil.pt: not a readable fedmae checkpoint (it holds a pickled Python object (posix.system)"], []),
    ("empty-checkpoint", _both(TINY, lambda tmp: (tmp / "empty.pt").write_bytes(b"")),
     ["evaluate", "--config", "experiment.yaml", "--checkpoint", "empty.pt", "--output", "out"],
     ["empty.pt: not a readable fedmae checkpoint (the file is empty)"], []),
    ("object-array-npz", _object_npz, ["data", "inspect", "pathmnist.npz"],
     ["pathmnist.npz: cannot read its arrays: not a MedMNIST .npz", "Python objects"], []),
    ("random-bytes-npz", _random_bytes("pathmnist.npz"), ["data", "inspect", "pathmnist.npz"],
     ["pathmnist.npz: not a MedMNIST .npz (neither a zip archive of arrays nor a NumPy array file)"], []),
]


@pytest.mark.parametrize("make,argv,words,absent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_true_line(tmp_path, make, argv, words, absent):
    marker = Path("/tmp/fedmae-bad-inputs-pwned")
    marker.unlink(missing_ok=True)
    make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = fedmae(*argv, cwd=tmp_path)
    err = result.stderr
    assert result.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmae: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    for word in [*absent, *UNSAFE_ADVICE]:
        assert word not in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not marker.exists()  # nothing unpickled
