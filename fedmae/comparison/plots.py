"""The comparison's figures (PNG, matplotlib without a display): pre-training loss per arm, the
downstream metric per site and arm, and MAE reconstructions through the federated encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedmae.comparison.report import POOLED, summarise  # noqa: E402
from fedmae.comparison.arms import ARM_TITLES  # noqa: E402
from fedmae.config import ExperimentConfig  # noqa: E402

COLOURS = {"centralised": "#1f77b4", "federated": "#d62728", "local": "#2ca02c", "none": "#7f7f7f"}


def pretraining_curves(results: list[dict[str, Any]], path: Path) -> Path:
    """Validation reconstruction loss per epoch (federated: after each round), mean over seeds."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm in dict.fromkeys(r["arm"] for r in results):
        curves = [r["pretrain_curve"] for r in results if r["arm"] == arm and r["pretrain_curve"]]
        if not curves:
            continue
        epochs = sorted({p["epoch"] for c in curves for p in c})
        mean = [np.nanmean([p["val_loss"] if p["val_loss"] is not None else np.nan
                            for c in curves for p in c if p["epoch"] == e]) for e in epochs]
        ax.plot(epochs, mean, label=ARM_TITLES[arm], color=COLOURS[arm], marker="." if len(epochs) < 30 else None)
    ax.set_xlabel("pre-training epoch")
    ax.set_ylabel("validation reconstruction loss (masked patches)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("MAE pre-training")
    return _save(fig, path)


def downstream(results: list[dict[str, Any]], cfg: ExperimentConfig, path: Path) -> Path:
    """Grouped bars: the main test metric per site (and pooled) for each arm, std over seeds as error bars."""
    summary = summarise(results, cfg)
    main, groups = summary["main"], [*summary["sites"], POOLED]
    arms = list(summary["arms"])
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.4 * len(groups) + 2), 4.0))
    x = np.arange(len(groups))
    shown: list[float] = []
    for i, arm in enumerate(arms):
        entry = summary["arms"][arm]
        stats = [entry["sites"][g][main] if g != POOLED else entry[POOLED][main] for g in groups]
        means = [s["mean"] if s["mean"] is not None else np.nan for s in stats]
        shown += means
        several = any(s["n"] > 1 for s in stats)  # error bars only when there is a spread to show
        stds = [s["std"] if s["n"] > 1 else 0.0 for s in stats] if several else None
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=ARM_TITLES[arm], color=COLOURS[arm])
    ax.set_xticks(x, groups)
    ax.set_ylabel(f"test {main}")
    finite = [v for v in shown if v == v]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.1), min(1.0, max(finite) + 0.05) if max(finite) <= 1 else None)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=min(4, len(arms)))
    ax.set_title(f"Downstream: {summary['finetune']} fine-tuning, test {main}")
    return _save(fig, path)


def reconstruction_figure(cfg: ExperimentConfig, cohort, seed_dir: Path, path: Path) -> Path | None:
    """A few validation cases (spread over the sites) through the federated global encoder, each
    with the decoder of its own site (decoders never leave a site); the centralised MAE when the
    comparison has no federated arm. None when neither ran."""
    from fedmae.checkpoint import load_checkpoint
    from fedmae.data.datasets import pretraining_dataset
    from fedmae.models.factory import build_mae
    from fedmae.models.state import encoder_state, load_encoder, load_model_state, load_part_state, site_local_state

    count = cfg.compare.reconstructions
    federated_run = seed_dir / "federated" / "flower"
    global_encoder = federated_run / "global" / "pretrain_last.pt"
    central = seed_dir / "centralised" / "pretrain" / "checkpoint_last.pt"
    if count == 0 or not (global_encoder.is_file() or central.is_file()):
        return None
    model = build_mae(cfg)
    federated = global_encoder.is_file()
    if federated:
        title = "federated encoder (FedAvg) with the case's own site's decoder"
        encoder = encoder_state(load_checkpoint(global_encoder)["model"])
    else:
        title = "centralised MAE"
        load_model_state(model, load_checkpoint(central, expect_kind="mae")["model"], str(central))
    images = []
    for i in range(count):  # round-robin over the sites
        site = cohort.sites[i % len(cohort.sites)]
        if i // len(cohort.sites) < len(site.val):
            images.append((site.name, site.val[i // len(cohort.sites)]))
    site_states: dict[str, dict[str, torch.Tensor] | None] = {}  # each site's last MAE state, read once
    panels = []
    for site_name, case in images:
        if federated:
            if site_name not in site_states:
                saved = sorted((federated_run / "sites" / site_name / "pretrain").glob("round_*.pt"))
                site_states[site_name] = load_checkpoint(saved[-1], expect_kind="site")["model"] if saved else None
            if site_states[site_name] is None:
                continue
            kept = set(site_local_state(model.state_dict()))  # a site keeps its decoder and mask token only
            load_part_state(model, site_states[site_name], kept, f"{site_name}'s MAE")
            load_encoder(model, encoder)
        image = pretraining_dataset([case.image], cfg, cohort.prep, train=False)[0]["image"]
        panels += reconstruction_panels(model, [(f"{site_name} {case.case_id}", torch.as_tensor(image))], cfg.seed)
    if not panels:
        return None
    return reconstructions(panels, f"Validation cases, {round(cfg.model.mask_ratio * 100)}% of patches masked:\n{title}", path)


def reconstructions(panels: list[dict[str, np.ndarray]], title: str, path: Path) -> Path:
    """Columns: cases; rows: original, masked input, reconstruction (2D images or middle slices)."""
    rows = ("original", "masked input", "reconstruction")
    fig, axes = plt.subplots(3, len(panels), figsize=(2.0 * len(panels), 6.2), squeeze=False)
    for j, panel in enumerate(panels):
        low, high = np.percentile(panel["original"], [1, 99])
        for i, row in enumerate(rows):
            ax = axes[i, j]
            ax.imshow(panel[row], cmap="gray", vmin=low, vmax=high if high > low else low + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row)
        axes[0, j].set_title(panel["name"], fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path)


@torch.no_grad()
def reconstruction_panels(model, images: list[tuple[str, torch.Tensor]], seed: int) -> list[dict[str, np.ndarray]]:
    """Original, masked input and reconstruction of each (name, image) with a fixed mask."""
    model.eval()
    device = next(model.parameters()).device
    panels = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, image in images:
            batch = image.unsqueeze(0).to(device).float()
            _, pred, mask = model(batch)
            recon = model.reconstruct(batch, pred, mask)
            patches = model.patchify(batch) * (1 - mask.unsqueeze(-1))
            masked = model.unpatchify(patches)
            panels.append({"name": name, **{k: _display(v) for k, v in
                           (("original", batch), ("masked input", masked), ("reconstruction", recon))}})
    return panels


def _display(volume: torch.Tensor) -> np.ndarray:
    """First channel; 3D volumes show their middle slice along the last (axial) axis."""
    array = volume[0, 0].float().cpu().numpy()
    while array.ndim > 2:
        array = array[..., array.shape[-1] // 2]
    return array


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

