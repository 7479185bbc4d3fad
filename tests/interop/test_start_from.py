"""A foreign encoder of each kind starts a federated run (``federated.start_from``) and a
fine-tune (``fedmae finetune --encoder``), every key of its file accounted for; a missing one is
refused by the config check, its format named or not."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedmae.checkpoint import load_checkpoint, save_checkpoint
from fedmae.federated.federation import FederatedRun
from fedmae.interop import export_encoder, import_encoder_for
from fedmae.models.factory import build_mae
from fedmae.typed_yaml import ConfigError
from tests.command_line import fedmae, write_config
from tests.federated.test_federation import ScriptedSites
from tests.interop.common import assert_every_key_accounted, config, monai_mae, monai_vit, save_torch, timm_vit
from tests.interop.reference_models import MaeViT, SelfMedMae, randomize
from tests.tiny import tiny_config, tiny_raw


def write_foreign(kind: str, folder: Path) -> tuple[str, int, set[str]]:
    """A file of ``kind`` as its own code writes it: (how to name it, its spatial dims, its keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "timm":
        state = timm_vit().state_dict()
        save_file(state, folder / "vit.safetensors")
        return str(folder / "vit.safetensors"), 2, set(state)
    if kind == "mae":
        state = randomize(MaeViT(in_chans=1)).state_dict()
        return str(save_torch({"model": state, "epoch": 799}, folder / "mae_pretrain.pth")), 2, set(state)
    if kind == "monai-vit":
        state = monai_vit(2, classification=True).state_dict()
        return str(save_torch(state, folder / "vit.pt")), 2, set(state)
    if kind == "monai-mae":
        state = monai_mae(3).state_dict()
        return str(save_torch(state, folder / "mae.pt")), 3, set(state)
    if kind == "selfmedmae":
        state = randomize(SelfMedMae(dims=3)).state_dict()
        return str(save_torch({"epoch": 1, "arch": "vit_base", "state_dict": state}, folder / "mae3d.pth.tar")), 3, set(state)
    assert kind == "fedmae-safetensors"
    cfg = config(2)
    checkpoint = save_checkpoint(folder / "pre" / "checkpoint_last.pt", kind="mae",
                                 model_state=randomize(build_mae(cfg)).state_dict(), config=cfg.to_dict(), epoch=1, step=1)
    out = export_encoder(checkpoint, "safetensors", folder / "encoder.safetensors")
    return str(out.weights), 2, set(import_encoder_for(out.weights, cfg, announce=False).mapped)


KINDS = ["timm", "mae", "monai-vit", "monai-mae", "selfmedmae", "fedmae-safetensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_federated_run_fine_tunes_from_a_foreign_encoder(tmp_path, caplog, kind):
    spec, dims, keys = write_foreign(kind, tmp_path / "foreign")
    cfg = tiny_config(dims, federated={"min_sites": 1, "finetune": "federated", "start_from": spec})
    with caplog.at_level(logging.INFO, logger="fedmae"):
        summary = FederatedRun(ScriptedSites(), cfg, tmp_path / "run", resume=False).run()
    imported = import_encoder_for(spec, cfg, announce=False)
    assert_every_key_accounted(imported, keys)
    assert summary["pretrain"] == {"start_from": spec, "format": kind}
    assert not list((tmp_path / "run" / "global").glob("pretrain_*"))
    # The scripted sites add the round number to every weight: round 1's model is the imported encoder + 1.
    first = load_checkpoint(tmp_path / "run" / "global" / "finetune_round_0001.pt", expect_kind="global")["model"]
    for key, value in imported.entries().items():
        torch.testing.assert_close(first[key], value + 1, msg=key)
    assert any(r.getMessage().startswith(f"using the encoder of {spec} ({kind}, detected") for r in caplog.records)


def test_start_from_names_the_format_and_a_missing_file_is_refused_by_the_config_check(tmp_path):
    spec, _, _ = write_foreign("monai-vit", tmp_path)
    cfg = tiny_config(federated={"finetune": "local", "start_from": f"monai-vit:{spec}"})
    assert cfg.federated.start_from == f"monai-vit:{spec}"
    assert import_encoder_for(cfg.federated.start_from, cfg, announce=False).format == "monai-vit"
    with pytest.raises(ConfigError, match=r"federated.start_from: needs 'random' or a pre-training checkpoint \(fedmae's, "
                                          r"or a foreign encoder as \[FORMAT:\]FILE, docs/interop.md\); "
                                          r"timm:missing.safetensors is not a file"):
        tiny_config(federated={"finetune": "local", "start_from": "timm:missing.safetensors"})


@pytest.mark.slow
def test_fedmae_finetune_starts_from_a_foreign_encoder_named_on_the_command_line(tmp_path):
    write_foreign("timm", tmp_path)
    config_file = write_config(tmp_path, tiny_raw(2, finetune={"epochs": 1, "warmup_epochs": 0}))
    result = fedmae("finetune", "--config", str(config_file), "--encoder", "timm:vit.safetensors", "--output", "ft",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using the encoder of vit.safetensors (timm, as named" in result.stderr
    assert "vit.safetensors: dropped head.*: a classification head" in result.stderr
    assert load_checkpoint(tmp_path / "ft" / "checkpoint_last.pt")["extra"]["init"] == "timm:vit.safetensors"


def test_fedmae_finetune_refuses_a_foreign_encoder_of_another_depth_before_writing(tmp_path):
    write_foreign("timm", tmp_path)
    config_file = write_config(tmp_path, tiny_raw(2, model={"depth": 3}))
    result = fedmae("finetune", "--config", str(config_file), "--encoder", "vit.safetensors", "--output", "ft",
                    cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fedmae: error: vit.safetensors: its encoder has 4 blocks, the model 3: set "
                                     "model.depth: 4")
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_a_flower_run_of_real_sites_fine_tunes_from_a_foreign_encoder(tmp_path):
    from tests.federated.in_process import run, setup_run

    spec, _, _ = write_foreign("mae", tmp_path / "foreign")
    grid, run_config = setup_run(tmp_path, num_sites=2,
                                 federated={"finetune": "federated", "min_sites": 2, "start_from": spec})
    summary = run(grid, run_config)
    out = Path(run_config["output-dir"])
    assert summary["pretrain"] == {"start_from": spec, "format": "mae"}
    assert not list((out / "global").glob("pretrain_*")) and (out / "global" / "finetune_best.pt").is_file()
    assert set(summary["finetune"]["test"]["sites"]) == {"site-0", "site-1"}


def test_a_fedmae_encoder_pre_trained_on_another_input_size_is_refused_as_start_from(tmp_path):
    # 16x64 and 32x32 have the same number of patches: the weights would load without complaint.
    other = tiny_config(2, model={"img_size": [16, 64]})
    checkpoint = save_checkpoint(tmp_path / "pre" / "checkpoint_last.pt", kind="mae", model_state=build_mae(other).state_dict(),
                                 config=other.to_dict(), epoch=1, step=1)
    cfg = tiny_config(2, federated={"min_sites": 1, "finetune": "federated", "start_from": str(checkpoint)})
    with pytest.raises(ValueError, match=r"the encoder was pre-trained on inputs of \[16, 64\], but the fine-tuning crops "
                                         r"are model.img_size \[32, 32\]"):
        FederatedRun(ScriptedSites(), cfg, tmp_path / "out", resume=False).run()
