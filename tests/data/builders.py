"""Small on-disk data sets in the real layouts, for tests of the readers and of everything after them.

They are written directly with PIL, numpy and csv, never through fedmae, so a reader bug cannot hide
behind a builder with the same bug. Pixel content depends on the labels (a bright blob per finding or
class), so a model trained on them has something to learn.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

CXR_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
# The real Data_Entry_2017.csv header: its bracketed names hold commas, so they read as two columns
# each, and every line ends with a comma (an empty last column).
CXR_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def cxr_image_name(patient: int, follow_up: int) -> str:
    """The NIH file name of a patient's (1-based) follow-up image: ``00000001_000.png``."""
    return f"{patient:08d}_{follow_up:03d}.png"


def cxr_labels(index: int) -> str:
    """Finding Labels of the ``index``-th image written: every third is "No Finding", the rest one or two."""
    if index % 3 == 0:
        return "No Finding"
    first = CXR_FINDINGS[index % len(CXR_FINDINGS)]
    if index % 3 == 1:
        return first
    return f"{first}|{CXR_FINDINGS[(index + 5) % len(CXR_FINDINGS)]}"


def _cxr_pixels(labels: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 60 + 40 * np.exp(-((xx - 0.5) ** 2) / 0.08) + rng.normal(0, 8, (size, size))
    for finding in labels.split("|"):
        if finding in CXR_FINDINGS:
            # Each finding brightens its own spot on a 4 x 4 grid.
            k = CXR_FINDINGS.index(finding)
            cy, cx = (k // 4 + 0.5) / 4, (k % 4 + 0.5) / 4
            image += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.004)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_chestxray14(
    root: Path,
    num_patients: int = 6,
    images_per_patient: int = 2,
    size: int = 64,
    seed: int = 0,
    split_lists: bool = True,
    sites: Sequence[str] | None = None,
) -> Path:
    """A ChestX-ray14 folder: PNGs under images_001/images and images_002/images, the label CSV, split lists.

    Patient ``p`` (1-based) has images ``cxr_image_name(p, 0..images_per_patient-1)`` with labels
    ``cxr_labels(i)`` for the running image number ``i``; even patients' images go to images_002.
    The last third of the patients (at least one) form test_list.txt. With ``sites``, a ``site``
    column assigns patient ``p`` to ``sites[(p - 1) % len(sites)]``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    num_test = max(1, num_patients // 3)
    rows, train_val, test = [], [], []
    for p in range(1, num_patients + 1):
        folder = root / f"images_{2 - p % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_patient):
            name, labels = cxr_image_name(p, k), cxr_labels(len(rows))
            Image.fromarray(_cxr_pixels(labels, size, rng)).save(folder / name)
            # The last field fills the header's trailing empty column, or the site column that replaces it.
            site = sites[(p - 1) % len(sites)] if sites else ""
            rows.append([name, labels, k, p, 40 + p, "MF"[p % 2], "PA", 2500, 2048, 0.143, 0.143, site])
            (test if p > num_patients - num_test else train_val).append(name)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        f.write(CXR_HEADER + ("site" if sites else "") + "\n")
        csv.writer(f, lineterminator="\n").writerows(rows)
    if split_lists:
        (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
        (root / "test_list.txt").write_text("".join(f"{n}\n" for n in test))
    return root


def write_medmnist(
    path: Path,
    dims: int = 2,
    multi_label: bool = False,
    n: tuple[int, int, int] = (12, 4, 4),
    size: int = 28,
    rgb: bool = False,
    seed: int = 0,
    num_classes: int | None = None,
) -> Path:
    """A MedMNIST-layout .npz: uint8 images and uint8 labels per official split (train, val, test).

    Images are (N, size, size) grey, (N, size, size, 3) with ``rgb``, or (N, size, size, size) with
    ``dims=3``. Labels are (N, 14) 0/1 rows with ``multi_label`` (chestmnist's width), else (N, 1)
    class indices below ``num_classes`` (default 2, valid for every known flavour). Name the file
    after the flavour it imitates (pathmnist.npz, chestmnist.npz, organmnist3d.npz).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = 14 if multi_label else 1
    classes = num_classes or (2 if not multi_label else 14)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        if multi_label:
            labels = (rng.random((count, width)) < 0.3).astype(np.uint8)
        else:
            labels = (np.arange(count) % classes).astype(np.uint8)[:, None]  # every class appears
        shape = (count,) + (size,) * dims + ((3,) if rgb and dims == 2 else ())
        images = rng.normal(60, 15, shape)
        # Brighter with the label: class index, or the number of findings present.
        images += 25 * labels.sum(axis=1).reshape((count,) + (1,) * (len(shape) - 1))
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez_compressed(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# Decathlon layout (NIfTI, written with nibabel)

CT_LABELS = {"0": "background", "1": "liver", "2": "spleen"}
MRI_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


def _ct_volume(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An abdomen-like CT in Hounsfield units: air around an elliptic body with two labelled organs."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid[0] / 0.8) ** 2 + (grid[1] / 0.9) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    label = np.zeros(shape, np.uint8)
    centre = rng.uniform(-0.15, 0.15, 3)
    liver = ((grid[0] - centre[0]) / 0.35) ** 2 + ((grid[1] + 0.35 - centre[1]) / 0.3) ** 2 + (grid[2] / 0.6) ** 2 < 1
    spleen = ((grid[0] - centre[0]) / 0.2) ** 2 + ((grid[1] - 0.45) / 0.18) ** 2 + ((grid[2] - centre[2]) / 0.4) ** 2 < 1
    label[liver & body], label[spleen & body] = 1, 2
    hu[label == 1] = 60 + rng.normal(0, 8, int((label == 1).sum()))
    hu[label == 2] = 110 + rng.normal(0, 8, int((label == 2).sum()))
    return hu.astype(np.int16), label


def write_decathlon(
    root: Path,
    num_training: int = 6,
    num_test: int = 2,
    shape: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    mri: bool = False,
    seed: int = 0,
) -> Path:
    """A Medical Segmentation Decathlon task folder: dataset.json, imagesTr, labelsTr, imagesTs.

    CT: int16 HU volumes. MRI (``mri=True``): BraTS-like 4-D volumes, four channels last, zero
    background and labels 1-3. Voxel spacing and an LPS-like affine as scanners write them.
    """
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # stored LPS-like, as DICOM converters do
    affine[:3, 3] = [100.0, 120.0, -50.0]
    prefix = "BRATS" if mri else "abdomen"
    training, test = [], []
    for i in range(num_training + num_test):
        hu, label = _ct_volume(shape, rng)
        if mri:
            body = hu > -500
            label = np.where(label == 1, 1, np.where(label == 2, 3, 0)).astype(np.uint8)
            label[(label == 1) & (rng.random(shape) < 0.3)] = 2
            channels = [np.where(body, 200 + 150 * (label == c) + rng.normal(0, 20, shape), 0) for c in range(4)]
            image = np.stack(channels, axis=-1).astype(np.float32)
        else:
            image = hu
        name = f"{prefix}_{i:03d}.nii.gz"
        if i < num_training:
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "BrainTumour" if mri else "Abdomen",
        "description": "written by the fedmae test builders",
        "tensorImageSize": "4D" if mri else "3D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"} if mri else {"0": "CT"},
        "labels": MRI_LABELS if mri else CT_LABELS,
        "numTraining": num_training,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save ``data`` (its dtype kept) as a NIfTI file at ``path``, creating folders; identity affine by default."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def plant_faults(root: Path) -> dict[str, str]:
    """Damage a CT folder written by ``write_decathlon`` by hand: one fault per case, seven cases.

    Requires a CT set (one channel, label values 0..2) with at least 6 training and 2 test cases:
    ``write_decathlon(root)`` with its defaults is enough; extra cases stay clean. The faults go to
    the cases in dataset.json order (dataset.json itself is not touched):

    - training[0]: image file deleted -> ``read_decathlon`` reports it and drops the case;
    - training[1]: image .nii.gz truncated to half its bytes (only a full scan reads that far);
    - training[2]: label replaced by one whose first axis is halved (shape mismatch);
    - training[3]: label with the same voxels but its affine moved +5 mm along x;
    - training[4]: one label voxel set to 7 (only a full scan with ``num_classes=3`` sees it);
    - training[5]: label replaced by the text "not a nifti";
    - test[0]: image rewritten as float32 with 3 NaN voxels (only a full scan sees it).

    Returns ``{path of the damaged file relative to root: fragment of the expected message}``, e.g.
    ``"imagesTr/abdomen_000.nii.gz": "does not exist"``. Each fault gives exactly one problem (from
    ``read_decathlon`` for the deleted file, from ``scan(..., num_classes=3)`` for the others) whose
    ``path`` is ``root / key`` and whose ``case_id`` is the key's file stem. The untouched files of
    the damaged cases (the image of a case with a bad label, and so on) stay valid.
    """
    root = Path(root)
    meta = json.loads((root / "dataset.json").read_text())
    training, test = meta["training"], meta["test"]
    if len(training) < 6 or len(test) < 2 or len(meta["modality"]) != 1:
        raise ValueError("plant_faults needs a CT set from write_decathlon with >= 6 training and >= 2 test cases")

    def rel(entry: str | dict, key: str = "image") -> str:
        return Path(entry if isinstance(entry, str) else entry[key]).as_posix()

    faults: dict[str, str] = {}

    # (a) a listed image that is gone
    gone = rel(training[0])
    (root / gone).unlink()
    faults[gone] = "image listed in dataset.json (training[0]) does not exist"

    # (b) a truncated image: the header survives, the voxels do not
    truncated = rel(training[1])
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 2])
    faults[truncated] = "cannot be read as NIfTI"

    # (c) a label map of another shape
    reshaped = rel(training[2], "label")
    image = nib.load(root / rel(training[2]))
    shape = list(image.shape)
    small = [shape[0] // 2, *shape[1:]]
    nib.save(nib.Nifti1Image(np.zeros(small, np.uint8), image.affine), root / reshaped)
    faults[reshaped] = f"label shape {small} does not match image shape {shape}"

    # (d) the right voxels on a grid moved 5 mm
    moved = rel(training[3], "label")
    label = nib.load(root / moved)
    affine = label.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj).astype(np.uint8), affine), root / moved)
    faults[moved] = "label affine differs from the image's by up to 5 mm"

    # (e) a label value outside the three declared classes
    outside = rel(training[4], "label")
    label = nib.load(root / outside)
    values = np.asarray(label.dataobj).astype(np.uint8)
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, label.affine), root / outside)
    faults[outside] = "label values [7] are outside the declared classes 0..2"

    # (f) not a number in an (unlabelled) test image
    nan_image = rel(test[0])
    image = nib.load(root / nan_image)
    volume = np.asarray(image.dataobj).astype(np.float32)
    volume.flat[[0, 17, 101]] = np.nan
    nib.save(nib.Nifti1Image(volume, image.affine), root / nan_image)
    faults[nan_image] = "has 3 NaN/Inf intensity value(s)"

    # (g) not a NIfTI file at all
    text = rel(training[5], "label")
    (root / text).write_text("not a nifti")
    faults[text] = "the file is damaged or not NIfTI"
    return faults
