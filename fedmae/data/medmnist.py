"""Reader for a MedMNIST v2/v3 ``.npz`` file the user already has (nothing is downloaded).

MedMNIST ships each flavour as one archive with the official train / val / test splits as
``<split>_images`` and ``<split>_labels``; v3 (MedMNIST+) adds larger sizes named ``<flavour>_<size>.npz``.
The flavour, read from the file name, says whether the images are volumes ("...3d") and, for the
known flavours, what the classes are called. The archive is opened with ``allow_pickle=False``: an
object array is refused instead of unpickled, since unpickling runs code from the file. Images are
small, so they are held in memory as float32 (C, *S) arrays in [0, 1].
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from fedmae.data.catalog import SPLITS, Case, Catalog, DataError, Problem
from fedmae.data.chestxray14 import FINDINGS

_ORGANS_2D = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
              "lung-left", "lung-right", "pancreas", "spleen")

# Class names (index = label value) from the MedMNIST package's INFO dict (medmnist/info.py).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "chestmnist": FINDINGS,  # the 14 ChestX-ray14 findings, named as the chestxray14 reader names them
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),  # diabetic-retinopathy grades, treated as classes
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"),
    "tissuemnist": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                    "Proximal Tubule Segments", "Thick Ascending Limb"),
    "organamnist": _ORGANS_2D,
    "organcmnist": _ORGANS_2D,
    "organsmnist": _ORGANS_2D,
    # The 3D flavour numbers the same organs in another order.
    "organmnist3d": ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder", "heart",
                     "lung-right", "lung-left", "spleen", "pancreas"),
    "nodulemnist3d": ("benign", "malignant"),
    "adrenalmnist3d": ("normal", "hyperplasia"),
    "fracturemnist3d": ("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
    "vesselmnist3d": ("vessel", "aneurysm"),
    "synapsemnist3d": ("inhibitory synapse", "excitatory synapse"),
}
MULTI_LABEL = frozenset({"chestmnist"})  # known flavours whose labels are (N, K) 0/1 rows


def flavour_of(path: str | Path) -> str:
    """``organmnist3d_64.npz`` -> ``organmnist3d``: the stem, lower-cased, without a v3 size suffix."""
    return re.sub(r"_\d+$", "", Path(path).stem.lower())


def read_medmnist(path: str | Path) -> Catalog:
    """All cases of a MedMNIST archive with their official splits, images in memory."""
    path = Path(path).expanduser().resolve()
    flavour = flavour_of(path)
    arrays = _load(path)
    layouts = {split: _layout(path, flavour, arrays[f"{split}_images"].shape) for split in SPLITS}
    if len(set(layouts.values())) > 1:
        raise DataError(f"{path}: the splits' images differ in layout ({layouts}); all must match")
    spatial_dims, channels = layouts["train"]
    labels = {split: _labels(path, arrays, split) for split in SPLITS}
    names, exclusive = _classes(path, flavour, labels)
    problems: list[Problem] = []
    cases: list[Case] = []
    for split in SPLITS:
        images = _to_float(path, arrays[f"{split}_images"], spatial_dims, channels)
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        for index, (image, label, ok) in enumerate(zip(images, labels[split], finite)):
            case_id = f"{split}-{index:05d}"
            if not ok:
                problems.append(Problem(str(path), f"{case_id}: image has NaN or infinite pixel values; skipped", case_id))
                continue
            findings = _findings(label, len(names), exclusive, flavour, path, case_id, problems)
            if findings is not None:
                cases.append(Case(case_id=case_id, image=image, findings=findings, split=split))
    return Catalog(
        source="medmnist", root=str(path), modality="other", spatial_dims=spatial_dims, cases=cases,
        findings=names, exclusive=exclusive, channels=channels, problems=problems,
    )


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the path of a MedMNIST .npz you have downloaded")
    keys = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    # NumPy's messages advise loading with allow_pickle (which runs code from the file); ours do not.
    try:
        # allow_pickle=False: an object array raises ValueError on access instead of running pickle code.
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a MedMNIST .npz ({_unreadable(path, e)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single array, not an .npz archive of MedMNIST splits")
    with npz:
        missing = [key for key in keys if key not in npz.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)}; a MedMNIST file holds {', '.join(keys)}")
        arrays = {}
        for key in keys:
            try:
                arrays[key] = npz[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"{path}: cannot read its arrays: not a MedMNIST .npz ({key}: {_unreadable(path, e)})") from None
        return arrays


def _unreadable(path: Path, err: Exception) -> str:
    """Why NumPy could not read the file (or one array), without its advice to unpickle."""
    text = str(err)
    if isinstance(err, ValueError) and "Object arrays" in text:
        return ("it holds Python objects, not numbers; MedMNIST arrays are numeric, and objects are never "
                "unpickled, since that can run code from the file")
    if isinstance(err, ValueError) and "pickle" in text:
        return "neither a zip archive of arrays nor a NumPy array file"
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, EOFError):
        return "the file ends early: truncated"
    if isinstance(err, zipfile.BadZipFile):
        return f"a damaged or truncated zip archive: {text}"
    return text if "pickle" not in text.lower() else type(err).__name__


def _layout(path: Path, flavour: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(spatial_dims, channels) from the images' shape, checked against the flavour's name."""
    volumes = flavour.endswith("3d")
    if len(shape) == 3 and not volumes:
        return 2, 1  # (N, H, W) grey
    if len(shape) == 4 and volumes:
        return 3, 1  # (N, D, H, W) grey volumes
    if len(shape) == 4 and shape[-1] in (1, 3):
        return 2, shape[-1]  # (N, H, W, C)
    if len(shape) == 3:
        raise DataError(f"{path}: images are {shape}, 2D, but the name says 3D ({flavour}); rename the file")
    if len(shape) == 4:
        raise DataError(
            f"{path}: images are {shape}: not 2D (N, H, W, 1 or 3); if they are volumes, "
            "name the file after a 3D flavour ending in 3d (e.g. organmnist3d.npz)"
        )
    raise DataError(f"{path}: images have rank {len(shape)} {shape}; expected (N, H, W), (N, H, W, 3) or (N, D, H, W)")


def _labels(path: Path, arrays: dict[str, np.ndarray], split: str) -> np.ndarray:
    """A split's labels as an (N, K) int64 array, checked against its images."""
    labels, images = arrays[f"{split}_labels"], arrays[f"{split}_images"]
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise DataError(f"{path}: {split}_labels has rank {labels.ndim} {labels.shape}; expected (N, K)")
    if len(labels) != len(images):
        raise DataError(f"{path}: {split}_images has {len(images)} images but {split}_labels has {len(labels)} rows")
    if labels.dtype.kind not in "biuf" or (labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
        raise DataError(f"{path}: {split}_labels are {labels.dtype}, not whole numbers")
    return labels.astype(np.int64)


def _classes(path: Path, flavour: str, labels: dict[str, np.ndarray]) -> tuple[tuple[str, ...], bool]:
    """The class names and whether they are exclusive, from the flavour when known, else the labels."""
    widths = {split: a.shape[1] for split, a in labels.items()}
    if len(set(widths.values())) > 1:
        raise DataError(f"{path}: the splits' labels differ in width ({widths}); all must match")
    width = widths["train"]
    known = CLASS_NAMES.get(flavour)
    if known is not None:
        expected = len(known) if flavour in MULTI_LABEL else 1
        if width != expected:
            raise DataError(f"{path}: labels have {width} column(s) but {flavour} has {expected}; is the file named right?")
        return known, flavour not in MULTI_LABEL
    if width > 1:
        return tuple(f"class_{k}" for k in range(width)), False
    top = max((int(a.max()) for a in labels.values() if a.size), default=0)
    return tuple(f"class_{k}" for k in range(top + 1)), True


def _to_float(path: Path, images: np.ndarray, spatial_dims: int, channels: int) -> np.ndarray:
    """(N, C, *S) float32: uint8 scaled to [0, 1], floats kept, channels moved first."""
    if images.dtype == np.uint8:
        out = images.astype(np.float32) / 255.0
    elif images.dtype.kind in "fb":
        out = images.astype(np.float32)
    else:
        raise DataError(f"{path}: images are {images.dtype}; expected uint8 (0-255) or float (0-1)")
    if out.ndim == spatial_dims + 1:
        return out[:, None]
    return np.ascontiguousarray(np.moveaxis(out, -1, 1))


def _findings(
    label: np.ndarray, num_classes: int, exclusive: bool, flavour: str, path: Path, case_id: str,
    problems: list[Problem],
) -> np.ndarray | None:
    """One case's target: the 0/1 row (multi-label) or a one-hot vector; None (skip) when invalid."""
    if not exclusive:
        if np.isin(label, (0, 1)).all():
            return label.astype(np.float32)
        problems.append(Problem(str(path), f"{case_id}: multi-label row {label.tolist()} has values other than 0/1; skipped", case_id))
        return None
    value = int(label[0])
    if not 0 <= value < num_classes:
        problems.append(Problem(
            str(path), f"{case_id}: label {value} is outside 0..{num_classes - 1} ({flavour} has {num_classes} classes); skipped",
            case_id,
        ))
        return None
    hot = np.zeros(num_classes, dtype=np.float32)
    hot[value] = 1.0
    return hot
