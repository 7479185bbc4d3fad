"""Configuration: strict loading, one-line errors naming the key, derived values, shipped configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from fedmae.config import ExperimentConfig, PrivacyConfig, default_skip_blocks, load_config, validate_federated
from fedmae.models.factory import build_finetune_model, build_mae
from fedmae.typed_yaml import ConfigError, build, to_plain
from tests.tiny import tiny_raw

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(REPO.glob("configs/**/*.yaml"))


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_come_from_the_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path, {}))
    assert cfg == ExperimentConfig()
    assert cfg.pretrain_lr == pytest.approx(1.5e-4 * 32 / 256)


# (section, key, value, words the one-line error must contain)
BAD_VALUES = [
    ("model", "dpeth", 4, "unknown key 'model.dpeth'"),
    ("pretrain", "epochs", "ten", "pretrain.epochs: expected an integer"),
    ("pretrain", "epochs", 2.5, "pretrain.epochs: expected an integer"),
    ("model", "norm_pix_loss", "yes", "model.norm_pix_loss: expected true/false"),
    ("model", "img_size", [33, 32], "model.img_size: every side must be a positive multiple of the patch size 8"),
    ("model", "img_size", [32, 32, 32], "model.img_size: vit_tiny_patch8_2d is 2D"),
    ("model", "mask_ratio", 1.0, "model.mask_ratio: must be strictly between 0 and 1"),
    ("model", "mask_ratio", 0.0, "model.mask_ratio: must be strictly between 0 and 1"),
    ("model", "name", "vit_huge_patch16_2d", "model.name: unknown model name"),
    ("model", "num_heads", 3, "model.num_heads: embed_dim 32 is not divisible"),
    ("task", "type", "detection", "task.type: expected one of 'classification', 'segmentation'"),
    ("data", "val_fraction", 1.5, "data.val_fraction: must be strictly between 0 and 1"),
    ("data", "image_size", [16, 16], "data.image_size: must be at least model.img_size"),
    ("finetune", "warmup_epochs", 10, "finetune.warmup_epochs: must be between 0 and epochs"),
    ("finetune", "layer_decay", 0.0, "finetune.layer_decay: must be in (0, 1]"),
    ("pretrain", "betas", [0.9], "pretrain.betas: expected a list of 2 numbers"),
    ("federated", "checkpoint_every", 0, "federated.checkpoint_every: must be at least 1, got 0"),
]


@pytest.mark.parametrize("section,key,value,words", BAD_VALUES)
def test_bad_value_names_file_and_key(tmp_path, section, key, value, words):
    raw = tiny_raw(2)
    raw.setdefault(section, {})[key] = value
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert words in message
    assert message.startswith(str(path))
    assert "\n" not in message


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modle' \(valid keys here: .*model"):
        load_config(write(tmp_path, {"modle": {}}))


def test_segmentation_checks_skip_blocks(tmp_path):
    raw = tiny_raw(2, "segmentation")
    raw["model"]["skip_blocks"] = [1, 2, 3]  # patch 8 takes two skips
    with pytest.raises(ConfigError, match="model.skip_blocks: patch 8 needs 2 skip blocks"):
        load_config(write(tmp_path, raw))


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, tiny_raw(2))
    cfg = load_config(path, ["pretrain.epochs=7", "model.img_size=[32, 48]", "pretrain.clip_grad=null"])
    assert cfg.pretrain.epochs == 7 and cfg.model.img_size == (32, 48) and cfg.pretrain.clip_grad is None
    with pytest.raises(ConfigError, match="unknown key 'pretrain.epoch'"):
        load_config(path, ["pretrain.epoch=7"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["pretrain.epochs"])


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_refused_but_braces_mean_all_defaults(tmp_path, text):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"experiment.yaml: the file is empty .* see configs/"):
        load_config(path)
    path.write_text("{}\n")
    assert load_config(path) == ExperimentConfig()


def test_duplicate_keys_are_refused_but_merge_keys_are_not(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text("task:\n  type: classification\n  regions: {TC: [1], TC: [2]}\n")
    with pytest.raises(ConfigError, match=r"'task.regions.TC' is given twice \(lines 3 and 3\)"):
        load_config(path)
    # `<<: *anchor` then a key of the anchored mapping is YAML's way to override it, not a duplicate.
    path.write_text("pretrain: &budget\n  epochs: 4\n  warmup_epochs: 1\nfinetune:\n  <<: *budget\n  epochs: 6\n")
    cfg = load_config(path)
    assert (cfg.pretrain.epochs, cfg.finetune.epochs, cfg.finetune.warmup_epochs) == (4, 6, 1)


def test_an_empty_section_takes_overrides(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text("pretrain:\n")
    assert load_config(path, ["pretrain.epochs=20"]).pretrain.epochs == 20


def test_federated_rounds_are_checked_for_federated_runs_only(tmp_path):
    # fedmae pretrain / finetune never read federated.local_epochs: they must not be refused over it.
    path = write(tmp_path, tiny_raw(2, federated={"local_epochs": 2, "finetune_local_epochs": 2}, pretrain={"epochs": 3}))
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"experiment.yaml: federated.local_epochs: must be at least 1 and divide "
                                          r"pretrain.epochs \(3\), got 2"):
        validate_federated(cfg, path)
    validate_federated(cfg, path, pretrain=False, finetune=False)
    with pytest.raises(ConfigError, match=r"federated.finetune_local_epochs: .* divide finetune.epochs \(3\), got 2"):
        validate_federated(cfg, pretrain=False)
    # start_from skips federated pre-training; federated.finetune: local has no federated fine-tuning rounds.
    start = tmp_path / "encoder.pt"
    start.write_bytes(b"")
    validate_federated(load_config(path, [f"federated.start_from={start}", "federated.finetune=local"]))
    with pytest.raises(ConfigError, match="federated.local_epochs: must be at least 1, got 0"):
        load_config(path, ["federated.local_epochs=0"])  # never a usable value, whatever the command


def test_differential_privacy_accepts_fedprox_as_documented(tmp_path):
    raw = tiny_raw(2, federated={"strategy": "fedprox", "privacy": {"dp": "server"}})
    assert load_config(write(tmp_path, raw)).federated.strategy == "fedprox"
    raw["federated"]["strategy"] = "fedadam"
    with pytest.raises(ConfigError, match="federated.strategy: differential privacy needs fedavg or fedprox"):
        load_config(write(tmp_path, raw))


@pytest.mark.parametrize("privacy", [{"dp": "server"}, {"dp": "client"}, {"secure_aggregation": True}],
                         ids=["server-dp", "client-dp", "secagg"])
def test_fedprox_is_accepted_with_either_dp_and_with_secure_aggregation(tmp_path, privacy):
    # docs/privacy.md: DP and SecAgg+ need fedavg or fedprox (FedProx changes only the sites' training).
    raw = tiny_raw(2, data={"num_sites": 3}, federated={"strategy": "fedprox", "privacy": privacy})
    cfg = load_config(write(tmp_path, raw))
    assert (cfg.federated.strategy, cfg.federated.privacy) == ("fedprox", PrivacyConfig(**privacy))


def test_differential_privacy_refuses_a_checkpoint_cadence_in_one_line(tmp_path):
    # A round released but not checkpointed would be released again after a resume, uncounted.
    path = write(tmp_path, tiny_raw(2, federated={"checkpoint_every": 2, "privacy": {"dp": "server"}}))
    with pytest.raises(ConfigError, match=r"federated.checkpoint_every: must be 1 with differential privacy, got 2: "
                                          r"every released round is checkpointed with the privacy ledger"):
        load_config(path)
    assert load_config(write(tmp_path, tiny_raw(2, federated={"checkpoint_every": 2}))).federated.checkpoint_every == 2


@pytest.mark.parametrize("dp", ["server", "client"])
@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_differential_privacy_refuses_server_optimisers_in_one_line(tmp_path, dp, strategy):
    path = write(tmp_path, tiny_raw(2, federated={"strategy": strategy, "privacy": {"dp": dp}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: federated.strategy: differential privacy needs fedavg or fedprox (its noise and "
                              f"accounting assume a plain average), got {strategy}")
    with pytest.raises(ConfigError, match=rf"^--set federated.strategy={strategy}: federated.strategy: differential"):
        load_config(write(tmp_path, tiny_raw(2, federated={"privacy": {"dp": dp}})), [f"federated.strategy={strategy}"])


def test_pretrain_and_finetune_keep_their_own_optimiser_defaults_and_key_order():
    cfg = ExperimentConfig().to_dict()
    optimiser = ["epochs", "warmup_epochs", "batch_size", "base_lr", "min_lr", "weight_decay", "betas", "clip_grad"]
    assert list(cfg["pretrain"]) == [*optimiser, "eval_every", "checkpoint_every"]
    assert list(cfg["finetune"]) == [*optimiser, "layer_decay", "drop_path", "label_fraction", "sw_overlap",
                                     "eval_every", "checkpoint_every"]
    assert [cfg["pretrain"][k] for k in optimiser] == [100, 10, 32, 1.5e-4, 0.0, 0.05, [0.9, 0.95], 3.0]
    assert [cfg["finetune"][k] for k in optimiser] == [50, 5, 16, 1e-3, 1e-6, 0.05, [0.9, 0.95], 3.0]
    assert ExperimentConfig().pretrain_lr == pytest.approx(1.5e-4 * 32 / 256)

def test_secure_aggregation_blames_the_key_that_was_set(tmp_path):
    raw = tiny_raw(2, federated={"privacy": {"secure_aggregation": True, "secagg_shares": 2}})
    with pytest.raises(ConfigError, match=r"federated.privacy.secagg_shares: need 2 <= secagg_threshold"):
        load_config(write(tmp_path, raw))
    raw["federated"]["privacy"].update(secagg_shares=3, secagg_threshold=3)
    with pytest.raises(ConfigError, match=r"federated.privacy.secagg_threshold: need 2 <= secagg_threshold"):
        load_config(write(tmp_path, raw))


@pytest.mark.parametrize("depth,patch,expected", [(12, 16, (4, 7, 10)), (6, 16, (2, 4, 5)), (4, 16, (1, 2, 3)), (12, 8, (4, 8)), (24, 16, (8, 14, 20))])
def test_default_skip_blocks_scale_the_paper(depth, patch, expected):
    assert default_skip_blocks(depth, patch) == expected


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, tiny_raw(3, "segmentation")))
    again = load_config(write(tmp_path, cfg.to_dict()))
    assert again == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    assert build_mae(cfg) is not None
    assert build_finetune_model(cfg, 3) is not None


def test_paper_btcv_matches_the_reported_parameter_counts():
    cfg = load_config(REPO / "configs/paper/btcv.yaml")
    mae = build_mae(cfg)
    encoder = sum(p.numel() for p in mae.encoder.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in mae.parameters() if p.requires_grad) - encoder
    assert encoder == pytest.approx(88e6, rel=0.02) and decoder == pytest.approx(16e6, rel=0.02)
    unetr = build_finetune_model(cfg, 14)
    head = sum(p.numel() for p in unetr.parameters()) - sum(p.numel() for p in unetr.encoder.parameters())
    assert head == pytest.approx(4.4e6, rel=0.02)
    assert cfg.skip_blocks == (4, 7, 10) and cfg.model.img_size == (96, 96, 96)


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-3 as a string; users mean a number.
    raw = tiny_raw(2)
    raw["finetune"]["base_lr"] = "5e-3"
    assert load_config(write(tmp_path, raw)).finetune.base_lr == pytest.approx(5e-3)
    raw["finetune"]["base_lr"] = "fast"
    with pytest.raises(ConfigError, match="finetune.base_lr: expected a number"):
        load_config(write(tmp_path, raw))


def test_readme_config_reference_names_every_key():
    import dataclasses

    readme = (REPO / "README.md").read_text()
    reference = readme[readme.index("## Config reference") :]
    cfg = ExperimentConfig()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        keys = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [section.name]
        for key in keys:
            assert f"`{key}`" in reference, f"README config reference lacks {section.name}.{key}"


@dataclass
class _Inner:
    size: tuple[int, ...] = (1,)
    mode: Literal["a", "b"] = "a"


@dataclass
class _Outer:
    rate: float = 0.1
    inner: _Inner = field(default_factory=_Inner)


def test_typed_yaml_builds_any_dataclass_tree_and_names_the_override():
    tree, source = build(_Outer, {"inner": {"size": [2, 3]}}, "toy.yaml", ["rate=5e-3"])
    assert tree == _Outer(rate=5e-3, inner=_Inner(size=(2, 3)))
    assert to_plain(tree) == {"rate": 5e-3, "inner": {"size": [2, 3], "mode": "a"}}
    assert source.set_by_user("inner.size") and not source.set_by_user("inner.mode")
    with pytest.raises(ConfigError, match=r"^--set inner.mode=c: inner.mode: expected one of 'a', 'b', got 'c'$"):
        build(_Outer, {}, "toy.yaml", ["inner.mode=c"])
    with pytest.raises(ConfigError, match=r"^toy.yaml: unknown key 'inner.colour' \(valid keys in inner: mode, size\)$"):
        build(_Outer, {"inner": {"colour": 1}}, "toy.yaml")
