"""The paper's data recipes: several crops per volume, label-guided fine-tuning crops (never in
pre-training), RandAugment, and crops that are the encoder's input size; each on built-in data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.transforms import MapTransform, RandCropByPosNegLabeld

from fedmae.checkpoint import save_checkpoint
from fedmae.config import ConfigError, config_from_dict, load_config
from fedmae.data.cohort import load_cohort
from fedmae.data.datasets import finetuning_dataset, pretraining_dataset
from fedmae.data.loader import EpochLoader, SeededDataset, epoch_seed
from fedmae.data.preprocess import RandAugmentd
from fedmae.data.synthetic import ORGANS
from fedmae.engine.finetune import finetune, finetune_schedule
from fedmae.engine.pretrain import pretrain_schedule, site_images
from fedmae.models.factory import build_finetune_model, build_mae
from fedmae.models.state import encoder_state, load_encoder
from tests.tiny import TINY_MODEL, tiny_config

PAPER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "paper"
# The data keys that make up a recipe (the rest of a paper config's data section is where its files are).
RECIPE_KEYS = ("flip_prob", "rotate_prob", "intensity_prob", "samples_per_volume", "finetune_crop", "pos_fraction",
               "randaugment_ops", "randaugment_magnitude")


def volumes(task_type: str = "segmentation", **data):
    """A tiny 3-D config: 16^3 crops (8 patches of 8^3) from built-in 24^3 volumes at one site."""
    return tiny_config(3, task_type, model={"img_size": [16, 16, 16]},
                       data={"image_size": [24, 24, 24], "num_sites": 1, "cases_per_site": 8, **data})


def radiographs(**data):
    """A tiny 2-D classification config with RandAugment: 32^2 crops from built-in 40^2 images."""
    return tiny_config(2, data={"image_size": [40, 40], "flip_prob": 0.0, "randaugment_ops": 2, **data})


def transforms_of(dataset: SeededDataset) -> list:
    return list(dataset.augment.transforms) if dataset.augment is not None else []


def keys_of(dataset: SeededDataset) -> set[str]:
    return {key for t in transforms_of(dataset) if isinstance(t, MapTransform) for key in t.keys}


# ---- several crops per volume ------------------------------------------------------------------


def test_several_crops_per_volume_fill_a_batch_of_volumes_times_crops():
    cfg = volumes(samples_per_volume=4, flip_prob=0.0)
    cohort = load_cohort(cfg)
    images = site_images(cohort.sites, "train")
    dataset = pretraining_dataset(images, cfg, cohort.prep, train=True)
    loader = EpochLoader(dataset, 2, shuffle=True)
    seed = epoch_seed(0, 0)
    batches = list(loader.epoch(seed))
    assert len(batches) == len(loader) == -(-len(images) // 2)  # a step is 2 volumes, whatever the crops
    assert [len(b["image"]) for b in batches] == [4 * min(2, len(images) - 2 * i) for i in range(len(batches))]
    assert batches[0]["image"].shape[1:] == (1, 16, 16, 16)
    # The first step holds its two volumes' crops side by side, each a 16^3 block of its volume.
    keys = next(iter(loader.batches))
    for position, (index, sample_seed) in enumerate(keys):
        crops = dataset[(index, sample_seed)]
        assert len(crops) == 4
        assert torch.equal(torch.stack([c["image"] for c in crops]), batches[0]["image"][4 * position:4 * position + 4])
        whole = dataset.store[index]["image"]  # (1, 24, 24, 24), cached
        blocks = whole.unfold(1, 16, 1).unfold(2, 16, 1).unfold(3, 16, 1)  # (1, 9, 9, 9, 16, 16, 16)
        offsets = [tuple(torch.nonzero((blocks == c["image"][:, None, None, None]).flatten(4).all(-1)[0])[0].tolist())
                   for c in crops]
        assert len(set(offsets)) > 1  # different places of the volume


def test_the_learning_rate_counts_crops_and_an_epoch_counts_volumes():
    cfg = tiny_config(3, data={"samples_per_volume": 4}, pretrain={"batch_size": 6, "base_lr": 1.5e-4},
                      finetune={"batch_size": 6, "base_lr": 1e-3})
    assert cfg.pretrain_crops_per_step == cfg.finetune_crops_per_step == 24  # the paper's BTCV: 6 volumes x 4 crops
    assert cfg.pretrain_lr == pytest.approx(1.5e-4 * 24 / 256)
    assert cfg.finetune_lr == pytest.approx(1e-3 * 24 / 256)
    pre, fine = pretrain_schedule(cfg, 18), finetune_schedule(cfg, 18)  # 18 volumes: 3 steps an epoch
    assert (pre.total_steps, pre.warmup_steps) == (3 * cfg.pretrain.epochs, 3 * cfg.pretrain.warmup_epochs)
    assert (fine.total_steps, fine.warmup_steps) == (3 * cfg.finetune.epochs, 3 * cfg.finetune.warmup_epochs)
    assert tiny_config(3).pretrain_lr == pytest.approx(1e-2 * 4 / 256)  # one crop per image: MAE's rule as before


# ---- label-guided crops: fine-tuning only -------------------------------------------------------


def test_pretraining_has_no_label_key_even_when_fine_tuning_crops_by_label():
    cfg = volumes(finetune_crop="pos_neg", samples_per_volume=2)
    cohort = load_cohort(cfg)
    pre = pretraining_dataset(site_images(cohort.sites, "train"), cfg, cohort.prep, train=True)
    assert keys_of(pre) == {"image"} and all(set(item) == {"image"} for item in pre.store)
    assert not any(isinstance(t, RandCropByPosNegLabeld) for t in transforms_of(pre))
    assert all(set(crop) == {"image"} for crop in pre[(0, 3)])
    # The same config does guide fine-tuning's crops by the label.
    fine = finetuning_dataset(cohort.sites[0].train, cohort.task, cfg, cohort.prep, train=True)
    assert isinstance(transforms_of(fine)[0], RandCropByPosNegLabeld) and "label" in keys_of(fine)


def test_label_guided_crops_hold_the_organ_and_random_crops_mostly_do_not():
    kidney = ORGANS.index("kidney_left")
    cfg = volumes(image_size=[48, 48, 48], flip_prob=0.0, samples_per_volume=4, finetune_crop="pos_neg", pos_fraction=1.0)
    cohort = load_cohort(cfg)
    # One small organ left in the label map (~0.3 % of the voxels): a crop centred on "foreground" holds it.
    cases = [dataclasses.replace(c, label=np.where(c.label == kidney, c.label, 0)) for c in cohort.sites[0].train]
    assert all((c.label == kidney).any() for c in cases)

    def crops_holding_the_kidney(recipe) -> list[bool]:
        dataset = finetuning_dataset(cases, cohort.task, recipe, cohort.prep, train=True)
        drawn = [crop for i in range(len(dataset)) for seed in range(3) for crop in dataset[(i, seed)]]
        assert len(drawn) == 4 * 3 * len(cases)
        assert all(c["image"].shape == c["label"].shape == (1, 16, 16, 16) for c in drawn)
        return [bool((c["label"] == kidney).any()) for c in drawn]

    guided = crops_holding_the_kidney(cfg)
    uniform = crops_holding_the_kidney(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, finetune_crop="random")))
    assert all(guided)
    assert sum(uniform) < 0.5 * len(uniform)  # measured: 10 of 60


@pytest.mark.parametrize("recipe", ["samples_per_volume", "pos_neg", "randaugment"])
def test_an_epoch_of_each_recipe_is_the_same_with_worker_processes(recipe):
    if recipe == "randaugment":
        cfg = radiographs()
        cohort = load_cohort(cfg)
        dataset = finetuning_dataset(cohort.sites[0].train, cohort.task, cfg, cohort.prep, train=True)
    elif recipe == "pos_neg":
        cfg = volumes(finetune_crop="pos_neg", samples_per_volume=2, flip_prob=0.5)
        cohort = load_cohort(cfg)
        dataset = finetuning_dataset(cohort.sites[0].train, cohort.task, cfg, cohort.prep, train=True)
    else:
        cfg = volumes(samples_per_volume=3, flip_prob=0.5)
        cohort = load_cohort(cfg)
        dataset = pretraining_dataset(site_images(cohort.sites, "train"), cfg, cohort.prep, train=True)
    in_process = EpochLoader(dataset, 2, shuffle=True, num_workers=0)
    workers = EpochLoader(dataset, 2, shuffle=True, num_workers=2)
    try:
        for epoch in (1, 2):
            a, b = list(in_process.epoch(epoch_seed(0, epoch))), list(workers.epoch(epoch_seed(0, epoch)))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    finally:
        del workers


# ---- RandAugment ------------------------------------------------------------------------------


def test_randaugment_changes_training_images_reproducibly_and_leaves_torchs_generator_alone():
    cfg = radiographs()
    cohort = load_cohort(cfg)
    cases = cohort.sites[0].train
    augmented = finetuning_dataset(cases, cohort.task, cfg, cohort.prep, train=True)
    plain = finetuning_dataset(cases, cohort.task, radiographs(randaugment_ops=0), cohort.prep, train=True)
    assert isinstance(transforms_of(augmented)[-2], RandAugmentd)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    first = augmented[(0, 11)]["image"]
    assert torch.equal(torch.rand(4), expected)  # masking and dropout draw as they would without it
    assert torch.equal(augmented[(0, 11)]["image"], first) and not torch.equal(augmented[(0, 12)]["image"], first)
    # The same crop as without RandAugment (the crop draws first), then changed by the operations.
    keys = [(i, seed) for i in range(len(cases)) for seed in range(4)]
    changed = sum(not torch.equal(augmented[k]["image"], plain[k]["image"]) for k in keys)
    assert changed >= 0.8 * len(keys)  # two identity operations leave an image as it was
    assert all(augmented[k]["image"].shape == (1, 32, 32) for k in keys)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_randaugment_operation_keeps_the_shape_and_range_of_a_normalised_image(channels):
    image = torch.randn(channels, 32, 32)  # z-scored intensities, negative ones included
    transform = RandAugmentd("image", num_ops=1, magnitude=9)
    outputs = []
    for seed in range(60):  # one operation of 14 per draw: the first 45 seeds draw every one
        transform.set_random_state(seed=seed)
        out = transform({"image": image.clone()})["image"]
        assert out.shape == image.shape and out.dtype == image.dtype and torch.isfinite(out).all()
        assert image.min() - 1e-4 <= out.min() and out.max() <= image.max() + 1e-4
        outputs.append(out)
    assert len({o.sum().item() for o in outputs}) > 14  # operations and signs vary


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dims,task_type,data,model,key", [
    (3, "classification", {"randaugment_ops": 2}, {}, "data.randaugment_ops"),
    (2, "segmentation", {"randaugment_ops": 2}, {}, "data.randaugment_ops"),
    (2, "classification", {"randaugment_ops": 2}, {"in_channels": 4}, "data.randaugment_ops"),
    (2, "classification", {"randaugment_magnitude": 11}, {}, "data.randaugment_magnitude"),
    (2, "classification", {"finetune_crop": "pos_neg"}, {}, "data.finetune_crop"),
    (2, "segmentation", {"samples_per_volume": 0}, {}, "data.samples_per_volume"),
    (2, "segmentation", {"pos_fraction": 1.5}, {}, "data.pos_fraction"),
])
def test_recipe_settings_that_cannot_work_are_refused_in_one_line(dims, task_type, data, model, key):
    with pytest.raises(ConfigError) as err:
        tiny_config(dims, task_type, data=data, model=model)
    assert f": {key}: " in str(err.value) and "\n" not in str(err.value)


def test_fine_tuning_refuses_an_encoder_pretrained_on_another_input_size(tmp_path):
    pretrained = tiny_config(2, model={"img_size": [32, 64]})
    mae = build_mae(pretrained)
    checkpoint = save_checkpoint(tmp_path / "mae.pt", kind="mae", model_state=mae.state_dict(),
                                 config=pretrained.to_dict(), epoch=1, step=1)
    cfg = tiny_config(2, model={"img_size": [64, 32]})
    # As many patches (8 x 4): the weights alone would load without complaint into the wrong grid.
    load_encoder(build_finetune_model(cfg, 4), encoder_state(mae.state_dict()))
    with pytest.raises(ValueError, match=r"pre-trained on inputs of \[32, 64\].*model\.img_size \[64, 32\]") as err:
        finetune(cfg, tmp_path / "run", encoder=checkpoint)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()  # refused before anything is written


# ---- the paper's configs ------------------------------------------------------------------------


@pytest.mark.parametrize("name,crops,finetune_crop,randaugment", [
    ("btcv", 4, "pos_neg", 0),
    ("brats", 1, "pos_neg", 0),
    ("chestxray14", 1, "random", 2),
])
def test_the_paper_configs_use_the_recipes(name, crops, finetune_crop, randaugment):
    cfg = load_config(PAPER_CONFIGS / f"{name}.yaml")
    d = cfg.data
    assert (d.samples_per_volume, d.finetune_crop, d.randaugment_ops) == (crops, finetune_crop, randaugment)
    if name == "btcv":  # the paper: 6 volumes x 4 crops a step, in both phases
        assert cfg.pretrain.batch_size == cfg.finetune.batch_size == 6
        assert cfg.pretrain_crops_per_step == cfg.finetune_crops_per_step == 24


@pytest.mark.parametrize("name", ["btcv", "brats", "chestxray14"])
def test_each_paper_recipe_draws_its_batches_from_built_in_data(name):
    # The paper config's recipe and task on a tiny model and tiny built-in data.
    raw = yaml.safe_load((PAPER_CONFIGS / f"{name}.yaml").read_text())
    dims = 3 if raw["model"]["name"].endswith("_3d") else 2
    raw["model"].update(name=f"vit_tiny_patch8_{dims}d", img_size=[16] * dims, **TINY_MODEL)
    raw["data"] = {**{k: v for k, v in raw["data"].items() if k in RECIPE_KEYS}, "source": "synthetic",
                   "image_size": [24] * dims, "num_sites": 1, "cases_per_site": 6, "num_workers": 0}
    cfg = config_from_dict(raw, f"{name}.yaml, shrunk")
    cohort = load_cohort(cfg)
    crop = (cfg.model.in_channels, *cfg.model.img_size)
    spv = cfg.data.samples_per_volume
    pre = pretraining_dataset(site_images(cohort.sites, "train"), cfg, cohort.prep, train=True)
    assert next(EpochLoader(pre, 2, shuffle=True).epoch(1))["image"].shape == (2 * spv, *crop)
    fine = finetuning_dataset(cohort.sites[0].train, cohort.task, cfg, cohort.prep, train=True)
    batch = next(EpochLoader(fine, 2, shuffle=True).epoch(1))
    assert batch["image"].shape == (2 * spv, *crop)
    if cfg.task.type == "segmentation":
        assert batch["label"].shape[0] == 2 * spv and batch["label"].shape[2:] == tuple(cfg.model.img_size)
