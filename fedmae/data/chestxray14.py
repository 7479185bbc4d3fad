"""Reader for the NIH ChestX-ray14 release as it unpacks: a label CSV, PNG folders, two split lists.

The release spreads 112,120 PNGs over ``images_001/images`` ... ``images_012/images`` (or one
``images`` folder after users merge them), so images are found by file name anywhere under the root,
indexed in one walk. Labels come from ``Data_Entry_2017.csv`` and are read by column name, because
the header's bracketed names contain commas and the 2017 and 2020 files differ in trailing columns.
The official split is patient-wise: ``test_list.txt`` is the test set; ``train_val_list.txt`` is left
to the seed, which draws validation from it. Pixels are never read here.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from fedmae.data.catalog import Case, Catalog, DataError, Problem

FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")  # first one present wins
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
SITE_COLUMN = "site"  # optional: a user-added column giving a natural partition
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"

# Finding names are matched ignoring case and space/underscore, so "pleural thickening" still counts.
_INDEX = {name.lower().replace(" ", "_"): i for i, name in enumerate(FINDINGS)}


def read_chestxray14(root: str | Path) -> Catalog:
    """Index a ChestX-ray14 folder: one case per row of the label CSV whose PNG exists under ``root``."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the ChestX-ray14 folder holding Data_Entry_2017.csv")
    csv_path = _find_csv(root)
    rows, site_column = _read_rows(csv_path)
    problems: list[Problem] = []
    pngs = _index_pngs(root, problems)
    test = _read_split_lists(root, {row["Image Index"].strip() for row in rows}, problems)
    cases: list[Case] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        case = _case(row, number, csv_path, root, pngs, test, site_column, seen, problems)
        if case is not None:
            cases.append(case)
    for name, path in sorted(pngs.items()):
        if name not in seen:
            problems.append(Problem(path, f"PNG not listed in {csv_path.name}; ignored"))
    return Catalog(
        source="chestxray14", root=str(root), modality="xray", spatial_dims=2, cases=cases,
        findings=FINDINGS, exclusive=False, channels=1, problems=problems,
    )


def _find_csv(root: Path) -> Path:
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {CSV_NAMES[0]} (or {CSV_NAMES[1]}); put the NIH label file in this folder")


def _read_rows(csv_path: Path) -> tuple[list[dict[str, str]], str | None]:
    """The CSV's rows keyed by stripped column name, and the name of its site column if it has one."""
    try:
        # utf-8-sig: a spreadsheet-saved CSV starts with a byte-order mark that would hide "Image Index".
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            rows = [dict(zip(header, (value.strip() for value in values))) for values in reader if any(values)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read as CSV ({e})") from None
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; the header must name {', '.join(REQUIRED)}")
    if not rows:
        raise DataError(f"{csv_path}: no rows under the header; it lists no images")
    site_column = next((name for name in header if name.lower() == SITE_COLUMN), None)
    return rows, site_column


def _index_pngs(root: Path, problems: list[Problem]) -> dict[str, str]:
    """File name -> absolute path of every PNG under ``root``, built in one walk."""
    pngs: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()  # a fixed walk order makes "which duplicate wins" reproducible
        for name in sorted(files):
            # Dot-files are macOS resource forks ("._00000001_000.png") and other debris, not images.
            if name.startswith(".") or not name.lower().endswith(".png"):
                continue
            path = os.path.join(folder, name)
            if name in pngs:
                problems.append(Problem(path, f"second copy of {name} (first: {pngs[name]}); ignored", name))
            else:
                pngs[name] = path
    return pngs


def _read_split_lists(root: Path, listed: set[str], problems: list[Problem]) -> set[str]:
    """The test set's file names; checks both lists against the CSV and against each other."""
    lists = {}
    for name in (TRAIN_VAL_LIST, TEST_LIST):
        path = root / name
        if path.is_file():
            with open(path, encoding="utf-8-sig") as f:
                lists[name] = [line.strip() for line in f if line.strip()]
            for image in lists[name]:
                if image not in listed:
                    problems.append(Problem(str(path), f"{image} is listed here but not in the label CSV", image))
    test = set(lists.get(TEST_LIST, ()))
    for image in sorted(test.intersection(lists.get(TRAIN_VAL_LIST, ()))):
        problems.append(Problem(str(root / TEST_LIST), f"{image} is in both {TRAIN_VAL_LIST} and {TEST_LIST}; kept in test", image))
    return test


def _case(
    row: dict[str, str], number: int, csv_path: Path, root: Path, pngs: dict[str, str], test: set[str],
    site_column: str | None, seen: set[str], problems: list[Problem],
) -> Case | None:
    name = row.get("Image Index", "")
    if not name:
        problems.append(Problem(str(csv_path), f"line {number} has no Image Index; skipped"))
        return None
    if name in seen:
        problems.append(Problem(str(csv_path), f"{name} is listed twice (again on line {number}); the repeat is skipped", name))
        return None
    seen.add(name)
    if name not in pngs:
        problems.append(Problem(str(csv_path), f"{name} listed in {csv_path.name} but not found under {root}", name))
        return None
    return Case(
        case_id=name,
        image=pngs[name],
        findings=_findings(row.get("Finding Labels", ""), name, csv_path, problems),
        site=row.get(site_column, "") if site_column else "",
        patient=row.get("Patient ID", ""),
        split="test" if name in test else None,
    )


def _findings(labels: str, name: str, csv_path: Path, problems: list[Problem]) -> np.ndarray | None:
    """The multi-hot vector of ``labels`` ("A|B" or "No Finding"); None (unlabelled) when empty."""
    if not labels:
        return None  # an image added without labels still serves pre-training
    hot = np.zeros(len(FINDINGS), dtype=np.float32)
    for finding in (part.strip() for part in labels.split("|")):
        if not finding or finding.lower() == NO_FINDING.lower():
            continue
        index = _INDEX.get(finding.lower().replace(" ", "_"))
        if index is None:
            problems.append(Problem(
                str(csv_path),
                f"{name}: unknown finding {finding!r} in Finding Labels; use {NO_FINDING!r} or any of {', '.join(FINDINGS)}",
                name,
            ))
        else:
            hot[index] = 1.0
    return hot
