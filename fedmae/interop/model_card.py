"""The JSON model card written beside an exported encoder.

It says what the encoder is (architecture, patch and image size, channels), what input it
expects (the intensity normalisation and voxel grid of the config it was trained with), what it
was trained on (the data source, each site's name and image count: never case ids, never
paths), how (centralised or federated, rounds, epochs, strategy) and under which privacy
guarantee (a federated global checkpoint's privacy ledger gives epsilon), and which fedmae and
packages wrote it. Counts come from the run's own records beside the checkpoint (``summary.json``
of a federated run, ``data_summary.json`` of ``fedmae pretrain`` / ``finetune``); where they are
missing the card says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedmae import __version__
from fedmae.checkpoint import sha256_of
from fedmae.config import ExperimentConfig

CARD_VERSION = 1
# The modality a source always has; others say it themselves (a Decathlon dataset.json) or the config does.
SOURCE_MODALITY = {"synthetic": "other", "chestxray14": "xray", "medmnist": "other"}
GUARANTEE = ("(epsilon, delta)-DP for adding or removing one whole site, covering the released weights only "
             "(Flower's RDP accountant, every site in every round)")


def model_card(payload: dict[str, Any], checkpoint: Path, cfg: ExperimentConfig,
               weights: dict[str, Any]) -> dict[str, Any]:
    """The card of the encoder of ``payload`` (read from ``checkpoint``, whose config is ``cfg``);
    ``weights``: the exported file's entry (file name, layout, how to load it)."""
    kind, extra = payload["kind"], payload.get("extra") or {}
    source = {"file": checkpoint.name, "kind": kind, "sha256": sha256_of(checkpoint)}
    source.update({k: extra[k] for k in ("phase", "round") if k in extra})
    if kind != "global":
        source["epoch"] = payload.get("epoch")
    return {
        "model_card_version": CARD_VERSION,
        "fedmae_version": __version__,
        "weights": weights,
        "source_checkpoint": source,
        "architecture": architecture(cfg, fine_tuned=_phase(payload) == "finetune"),
        "input": expected_input(cfg),
        "training": training(payload, cfg),
        "data": data_summary(payload, checkpoint, cfg),
        "privacy": privacy(payload, cfg),
        "versions": dict(payload.get("versions") or {}),
    }


def _phase(payload: dict[str, Any]) -> str:
    kind = payload["kind"]
    return (payload.get("extra") or {}).get("phase", "finetune" if kind == "finetune" else "pretrain")


def architecture(cfg: ExperimentConfig, fine_tuned: bool) -> dict[str, Any]:
    size, patch = cfg.size, cfg.patch_size
    return {
        "model": cfg.model.name,
        "type": "ViT encoder: patch embedding (strided convolution), cls token, absolute position table, "
                "pre-norm transformer blocks (timm's Block), final LayerNorm",
        "spatial_dims": cfg.spatial_dims,
        "img_size": list(cfg.model.img_size),
        "patch_size": patch,
        "grid_size": [s // patch for s in cfg.model.img_size],
        "in_channels": cfg.model.in_channels,
        "embed_dim": size.embed_dim,
        "depth": size.depth,
        "num_heads": size.num_heads,
        "mlp_ratio": cfg.model.mlp_ratio,
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
        "cls_token": True,
        "position_table": "learned (fine-tuned from the sin-cos table)" if fine_tuned
                          else f"fixed {cfg.spatial_dims}-D sin-cos, with a zero row for the cls token",
    }


def expected_input(cfg: ExperimentConfig) -> dict[str, Any]:
    """What an image must look like to the encoder, as the config's preprocessing made it."""
    from fedmae.data.preprocess import DEFAULT_NORMALIZE, DEFAULT_SPACING

    d, dims = cfg.data, cfg.spatial_dims
    modality = d.modality if d.modality != "auto" else SOURCE_MODALITY.get(d.source)
    normalize = d.normalize if d.normalize != "auto" else DEFAULT_NORMALIZE.get(modality or "", "auto")
    sizes = ", ".join(map(str, cfg.model.img_size))
    described = {
        "window": f"clipped to the window [{d.window[0]:g}, {d.window[1]:g}] (CT: HU) and mapped to [0, 1]",
        "zscore": "each channel standardised to mean 0, standard deviation 1 over the whole image",
        "zscore_nonzero": "each channel standardised over its non-zero voxels (MRI: the background stays 0)",
        "none": "as stored",
        "auto": "by modality (CT: window; MRI: z-score over non-zero voxels; otherwise z-score)",
    }
    out: dict[str, Any] = {
        "shape": f"(B, {cfg.model.in_channels}, {sizes})",
        "modality": modality or f"auto (as the {d.source} data set describes itself)",
        "intensity": {"normalize": normalize, "how": described[normalize]},
    }
    if normalize == "window":
        out["intensity"]["window"] = list(d.window)
    if dims == 3:
        volumetric = modality in ("ct", "mri") or modality is None
        out["orientation"] = "RAS"
        if volumetric and d.resample:
            spacing = d.spacing or DEFAULT_SPACING.get(modality or "")
            out["spacing_mm"] = list(spacing) if spacing else "the modality's default (CT 1.5x1.5x2.0, MRI 1x1x1)"
        else:
            out["spacing_mm"] = "as stored"
        out["crop_foreground"] = volumetric and d.crop_foreground
        out["crop"] = f"random {sizes} crops of the volume (sliding windows at inference)"
    else:
        out["image_size"] = list(cfg.data_image_size)  # pictures are resized to it (or made at it), then cropped
    return out


def training(payload: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    kind, extra, phase = payload["kind"], payload.get("extra") or {}, _phase(payload)
    m, fed = cfg.model, cfg.federated
    out: dict[str, Any] = {"federated": kind == "global", "phase": phase}
    if phase == "pretrain":
        out["objective"] = {"method": "masked autoencoder (MAE)", "mask_ratio": m.mask_ratio,
                            "norm_pix_loss": m.norm_pix_loss}
        out["epochs"] = cfg.pretrain.epochs
        if kind == "mae":
            out["epochs_done"] = payload.get("epoch")
    else:
        task = extra.get("task") or {"type": cfg.task.type}
        out["task"] = task
        out["epochs"] = cfg.finetune.epochs
        if kind == "finetune":
            out["epochs_done"] = payload.get("epoch")
            init = str(extra.get("init", "random"))
            out["started_from"] = init if init == "random" else Path(init.split(":")[-1]).name
    if kind == "global":
        rounds = cfg.pretrain_rounds if phase == "pretrain" else cfg.finetune_rounds
        local = fed.local_epochs if phase == "pretrain" else fed.finetune_local_epochs
        out.update({"round": extra.get("round"), "rounds": rounds, "local_epochs_per_round": local,
                    "strategy": fed.strategy, "fraction_of_sites_per_round": fed.fraction_train,
                    "transport": fed.transport})
    return out


def data_summary(payload: dict[str, Any], checkpoint: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """Sites and their image counts from the run's records beside the checkpoint."""
    out: dict[str, Any] = {"source": cfg.data.source}
    if payload["kind"] == "global":
        record = checkpoint.resolve().parent.parent / "summary.json"  # <run>/global/<checkpoint>
        sites = _json(record).get("sites")
        if isinstance(sites, dict):
            rows = [{"site": str(name), "images": int(info.get("images", 0))} for name, info in sites.items()]
            out.update(sites=rows, images=sum(r["images"] for r in rows), counted="training images per site "
                       "(labelled and unlabelled), as the sites reported them", recorded_in="summary.json")
            return out
    else:
        record = checkpoint.resolve().parent / "data_summary.json"
        sites = _json(record).get("sites")
        if isinstance(sites, list):
            pretraining = _phase(payload) == "pretrain"
            rows = [{"site": str(r.get("site")), "images": int(r.get("train", 0)) + int(r.get("unlabelled", 0))}
                    if pretraining else {"site": str(r.get("site")), "labelled_training_cases": int(r.get("train", 0))}
                    for r in sites]
            key = "images" if pretraining else "labelled_training_cases"
            out.update(sites=rows, **{key: sum(r[key] for r in rows)}, recorded_in="data_summary.json")
            if not pretraining:
                out["label_fraction"] = cfg.finetune.label_fraction
            return out
    out.update(sites=None, note=f"{record.name} was not found beside the checkpoint: the sites and counts are unknown")
    return out


def privacy(payload: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    p = cfg.federated.privacy
    if payload["kind"] != "global":
        return {"differential_privacy": "none", "secure_aggregation": False,
                "note": "centralised training: no federated privacy mechanism applies to these weights"}
    out: dict[str, Any] = {"differential_privacy": p.dp, "secure_aggregation": p.secure_aggregation}
    if p.dp == "none":
        return out
    out.update(noise_multiplier=p.noise_multiplier, clipping=p.clipping, clipping_norm=p.clipping_norm, delta=p.delta)
    ledger = (payload.get("metrics") or {}).get("privacy")
    if not ledger:
        out.update(epsilon=None, note="the checkpoint holds no privacy ledger")
        return out
    epsilon, releases = epsilon_from_ledger(str(ledger), p.delta)
    out.update(epsilon=round(epsilon, 4), releases=releases, guarantee=GUARANTEE)
    return out


def epsilon_from_ledger(ledger: str, delta: float) -> tuple[float, int]:
    """Epsilon at ``delta`` and the number of releases of a global checkpoint's privacy ledger
    (``server/privacy.py`` writes it: Flower's RDP accountant state, alone or under ``"rdp"``
    with adapted clipping norms), recomputed with Google's dp-accounting as Flower's accountant
    does, without importing Flower into the library."""
    from dp_accounting import dp_event, privacy_accountant, rdp

    state = json.loads(ledger)
    state = state.get("rdp", state)
    config = state["config"]
    relation = {"add-or-remove-one": privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE,
                "replace-one": privacy_accountant.NeighboringRelation.REPLACE_ONE}[config["neighboring_relation"]]
    accountant = rdp.RdpAccountant(orders=state["orders"], neighboring_relation=relation)
    releases = 0
    for composition in state["compositions"]:
        event, count = composition["event"], int(composition["count"])
        gaussian = dp_event.GaussianDpEvent(event["noise_multiplier"])
        sampling = config["sampling_method"]
        if sampling == "poisson":
            gaussian = dp_event.PoissonSampledDpEvent(event["sample_size"] / event["population_size"], gaussian)
        elif sampling == "without-replacement":
            gaussian = dp_event.SampledWithoutReplacementDpEvent(event["population_size"], event["sample_size"],
                                                                 gaussian)
        accountant.compose(gaussian, count)
        releases += count
    epsilon = float(accountant.get_epsilon(delta)) if releases else 0.0
    return (epsilon if math.isfinite(epsilon) else float("inf")), releases


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
