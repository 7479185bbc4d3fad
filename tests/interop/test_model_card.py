"""The model card beside an export: what the encoder is and expects, what it was trained on (sites
and image counts from the run's records, never case ids or paths), how, and the privacy
ledger's epsilon as the server's accountant reports it."""

from __future__ import annotations

import json

import pytest
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedmae.checkpoint import save_checkpoint
from fedmae.engine.pretrain import pretrain
from fedmae.federated.federation import FederatedRun
from fedmae.interop import export_encoder
from fedmae.interop.model_card import epsilon_from_ledger
from fedmae.models.factory import build_mae
from fedmae.models.state import encoder_entries
from server.privacy import Accountant
from tests.federated.test_federation import ScriptedSites
from tests.tiny import tiny_config


def all_case_ids(splits: dict) -> list[str]:
    return [case for site in splits["sites"].values() for ids in site.values() for case in ids]


@pytest.mark.slow
def test_card_of_a_centralised_run_counts_its_sites_images_and_names_no_case(tmp_path):
    cfg = tiny_config(2, pretrain={"epochs": 1, "warmup_epochs": 0})
    run = pretrain(cfg, tmp_path / "pre")
    out = export_encoder(run.checkpoint, "safetensors", tmp_path / "export" / "encoder.safetensors")
    text = out.card.read_text()
    card = json.loads(text)
    summary = json.loads((tmp_path / "pre" / "data_summary.json").read_text())
    assert card["data"]["sites"] == [{"site": row["site"], "images": row["train"] + row["unlabelled"]}
                                     for row in summary["sites"]]
    assert card["data"]["images"] == sum(row["images"] for row in card["data"]["sites"]) > 0
    expected = {"model": "vit_tiny_patch8_2d", "img_size": [32, 32], "patch_size": 8, "grid_size": [4, 4],
                "in_channels": 1, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 4.0}
    assert {key: card["architecture"][key] for key in expected} == expected
    assert card["input"]["intensity"]["normalize"] == "zscore" and card["input"]["shape"] == "(B, 1, 32, 32)"
    assert card["training"] == {"federated": False, "phase": "pretrain", "epochs": 1, "epochs_done": 1,
                                "objective": {"method": "masked autoencoder (MAE)", "mask_ratio": 0.75,
                                              "norm_pix_loss": True}}
    assert card["privacy"]["differential_privacy"] == "none"
    assert card["source_checkpoint"]["file"] == "checkpoint_last.pt" and card["versions"]["torch"]
    for case in all_case_ids(json.loads((tmp_path / "pre" / "splits.json").read_text())):
        assert case not in text
    assert str(tmp_path) not in text  # no paths: a card travels with the weights


def test_card_of_a_federated_global_model_gives_its_rounds_strategy_and_sites(tmp_path):
    cfg = tiny_config(pretrain={"epochs": 4}, finetune={"epochs": 4},
                      federated={"min_sites": 1, "finetune": "none", "strategy": "fedprox"})
    FederatedRun(ScriptedSites(), cfg, tmp_path / "run", resume=False).run()
    out = export_encoder(tmp_path / "run" / "global" / "pretrain_last.pt", "monai", tmp_path / "encoder.safetensors")
    card = json.loads(out.card.read_text())
    assert card["data"]["sites"] == [{"site": "site-1", "images": 10}, {"site": "site-2", "images": 10}]
    assert card["data"]["recorded_in"] == "summary.json"
    training = card["training"]
    assert training["federated"] and training["round"] == 4 and training["rounds"] == 4
    assert training["strategy"] == "fedprox" and training["local_epochs_per_round"] == 1
    assert card["privacy"] == {"differential_privacy": "none", "secure_aggregation": False}


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_card_gives_the_epsilon_the_servers_accountant_reports_for_the_ledger(tmp_path, clipping):
    cfg = tiny_config(federated={"privacy": {"dp": "server", "noise_multiplier": 1.3, "clipping": clipping}})
    accountant = Accountant(cfg.federated.privacy, num_sites=3)
    accountant.accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.3, sample_size=3, population_size=3), count=5)
    if clipping == "adaptive":
        accountant.clipping_norms["pretrain"] = 0.7
    ledger = accountant.ledger()
    path = save_checkpoint(tmp_path / "run" / "global" / "pretrain_round_0005.pt", kind="global",
                           model_state=encoder_entries(build_mae(cfg).state_dict()), config=cfg.to_dict(), epoch=5,
                           step=5, metrics={"privacy": ledger}, extra={"phase": "pretrain", "round": 5})
    card = json.loads(export_encoder(path, "safetensors", tmp_path / "encoder.safetensors").card.read_text())
    privacy = card["privacy"]
    assert privacy["epsilon"] == pytest.approx(accountant.spent()["epsilon"], abs=1e-4)
    assert privacy["releases"] == 5 and privacy["delta"] == 1e-5 and privacy["noise_multiplier"] == 1.3
    assert "whole site" in privacy["guarantee"]
    assert card["data"]["sites"] is None and "summary.json was not found" in card["data"]["note"]


def test_an_empty_ledger_spends_nothing():
    cfg = tiny_config(federated={"privacy": {"dp": "server"}})
    assert epsilon_from_ledger(Accountant(cfg.federated.privacy, num_sites=2).ledger(), 1e-5) == (0.0, 0)
