"""Tests for the synthetic multi-hospital generator (fedmae.data.synthetic)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedmae.data.synthetic import (
    FINDINGS,
    ORGANS,
    Scanner,
    SyntheticCase,
    _render,
    generate_case,
    generate_hospitals,
    generate_site,
    scanner_profiles,
)

REF2 = scanner_profiles(1, 2, 0)[0]


def _cases_2d(n: int, seed: int = 0) -> list[SyntheticCase]:
    return [generate_case(2, (48, 48), 1, REF2, seed, 0, i) for i in range(n)]


@pytest.fixture(scope="module")
def ref_cases() -> list[SyntheticCase]:
    return _cases_2d(200)


@pytest.mark.parametrize(
    ("spatial_dims", "shape", "in_channels"),
    [(2, (64, 64), 1), (2, (48, 80), 4), (3, (32, 32, 32), 1), (3, (24, 40, 32), 4)],
)
def test_shapes_and_dtypes(spatial_dims: int, shape: tuple[int, ...], in_channels: int) -> None:
    scanner = scanner_profiles(2, spatial_dims, 0)[1]
    case = generate_case(spatial_dims, shape, in_channels, scanner, 0, 1, 7)
    assert case.case_id == "site-1-case-0007" and case.site == "site-1"
    assert case.image.shape == (in_channels, *shape) and case.image.dtype == np.float32
    assert case.label.shape == shape and case.label.dtype == np.int64
    assert case.findings.shape == (len(FINDINGS),) and case.findings.dtype == np.float32
    assert np.isfinite(case.image).all()
    assert case.label.min() >= 0 and case.label.max() < len(ORGANS)
    assert set(np.unique(case.findings)) <= {0.0, 1.0}


@pytest.mark.parametrize(("spatial_dims", "shape"), [(2, (64, 64)), (3, (48, 48, 48))])
def test_every_organ_present(spatial_dims: int, shape: tuple[int, ...]) -> None:
    scanner = scanner_profiles(1, spatial_dims, 0)[0]
    for i in range(3):
        label = generate_case(spatial_dims, shape, 1, scanner, 0, 0, i).label
        assert set(np.unique(label)) == set(range(len(ORGANS)))


@pytest.mark.parametrize(("spatial_dims", "shape", "in_channels"), [(2, (40, 56), 1), (3, (24, 32, 16), 2)])
def test_deterministic(spatial_dims: int, shape: tuple[int, ...], in_channels: int) -> None:
    a = generate_hospitals(2, 2, spatial_dims, shape, in_channels, seed=3)
    b = generate_hospitals(2, 2, spatial_dims, shape, in_channels, seed=3)
    c = generate_hospitals(2, 2, spatial_dims, shape, in_channels, seed=4)
    assert list(a) == ["site-0", "site-1"]
    for site in a:
        for x, y, z in zip(a[site], b[site], c[site]):
            assert np.array_equal(x.image, y.image) and np.array_equal(x.label, y.label)
            assert np.array_equal(x.findings, y.findings)
            assert not np.array_equal(x.image, z.image)


def test_case_independent_of_other_cases() -> None:
    scanner = scanner_profiles(3, 2, 5)[2]
    site = generate_site(2, 4, 2, (32, 32), 1, scanner, seed=5)
    alone = generate_case(2, (32, 32), 1, scanner, 5, 2, 3)
    assert np.array_equal(site[3].image, alone.image)
    assert scanner_profiles(2, 2, 5)[1] == scanner_profiles(4, 2, 5)[1]
    assert len(generate_hospitals(2, [1, 3], 2, (16, 16))["site-1"]) == 3


def test_scanner_profiles() -> None:
    ref = scanner_profiles(1, 3, 0)[0]
    assert (ref.intensity_scale, ref.intensity_offset, ref.gamma, ref.bias_strength, ref.blur_sigma) == (1, 0, 1, 0, 0)
    assert len(ref.spacing) == 3 and len(scanner_profiles(1, 2, 0)[0].spacing) == 2
    same = scanner_profiles(4, 3, 9, heterogeneity=0.0)
    assert [s.name for s in same] == ["site-0", "site-1", "site-2", "site-3"]
    assert all(dataclasses.replace(s, name="x") == dataclasses.replace(ref, name="x") for s in same)
    varied = scanner_profiles(6, 3, 9)[1:]
    assert len({s.intensity_scale for s in varied}) == 5
    for s in varied:
        assert 0.6 <= s.intensity_scale <= 1.6 and -0.2 <= s.intensity_offset <= 0.2 and 0.7 <= s.gamma <= 1.4
        assert 0.01 <= s.noise_std <= 0.08 and 0 <= s.bias_strength <= 0.3 and 0 <= s.blur_sigma <= 1.2


def test_sites_differ_in_intensity_statistics() -> None:
    def body_stats(hospitals: dict[str, list[SyntheticCase]]) -> np.ndarray:
        # Organ voxels, so that the statistic does not depend on how much air a site's patients show.
        vals = [np.concatenate([c.image[0][c.label > 0] for c in cases]) for cases in hospitals.values()]
        return np.array([[v.mean(), v.std()] for v in vals])  # (sites, 2)

    # Enough patients per site that their own variation (contrast enhancement, fatty livers) averages out.
    same = body_stats(generate_hospitals(4, 40, 2, (48, 48), seed=0, heterogeneity=0.0))
    assert np.allclose(same, same[0], rtol=0.12)  # only the patients differ
    varied = body_stats(generate_hospitals(4, 40, 2, (48, 48), seed=0, heterogeneity=1.0))
    rel = np.abs(varied[1:] / varied[0] - 1)  # (sites - 1, 2)
    assert (rel.max(axis=1) > 0.15).all()


def test_findings_prevalence(ref_cases: list[SyntheticCase]) -> None:
    prevalence = np.stack([c.findings for c in ref_cases]).mean(0)
    assert ((prevalence >= 0.2) & (prevalence <= 0.55)).all(), dict(zip(FINDINGS, prevalence))


def test_findings_visible_in_groups(ref_cases: list[SyntheticCase]) -> None:
    f = np.stack([c.findings for c in ref_cases]).astype(bool)  # (N, findings)
    liver_low = np.array([np.percentile(c.image[0][c.label == 1], 3) for c in ref_cases])
    kidney_dark = np.array([(c.image[0][(c.label == 3) | (c.label == 4)] < 0.15).sum() for c in ref_cases])
    non_spine_max = np.array([c.image[0][c.label != 5].max() for c in ref_cases])
    liver_size = np.array([(c.label == 1).sum() for c in ref_cases])
    assert liver_low[f[:, 0]].mean() < liver_low[~f[:, 0]].mean() - 0.05
    assert kidney_dark[f[:, 1]].mean() > kidney_dark[~f[:, 1]].mean() + 2  # darker than the hilum fat
    assert non_spine_max[f[:, 2]].mean() > non_spine_max[~f[:, 2]].mean() + 0.03
    assert liver_size[f[:, 3]].mean() > 1.3 * liver_size[~f[:, 3]].mean()


@pytest.mark.parametrize(
    ("spatial_dims", "shape", "finding", "organs"),
    [(2, (64, 64), 0, (1,)), (2, (64, 64), 1, (3, 4)), (2, (64, 64), 2, (0, 2)), (3, (32, 32, 32), 0, (1,)),
     (3, (32, 32, 32), 1, (3, 4))],
)
def test_local_finding_changes_only_its_organ(spatial_dims: int, shape: tuple[int, ...], finding: int,
                                              organs: tuple[int, ...]) -> None:
    # Same random stream with the finding forced off/on: labels are untouched, pixels change only in the organ.
    scanner = scanner_profiles(1, spatial_dims, 0)[0]
    off, on = np.zeros(len(FINDINGS), bool), np.zeros(len(FINDINGS), bool)
    on[finding] = True
    img0, lab0 = _render(np.random.default_rng(11), spatial_dims, shape, 1, scanner, off)
    img1, lab1 = _render(np.random.default_rng(11), spatial_dims, shape, 1, scanner, on)
    assert np.array_equal(lab0, lab1)
    changed = np.abs(img1 - img0)[0] > 1e-6
    assert changed.sum() >= 4
    assert np.isin(lab0[changed], organs).all()
    assert np.abs(img1 - img0).max() > 0.2


def test_enlarged_liver_grows_liver_label() -> None:
    off, on = np.zeros(len(FINDINGS), bool), np.zeros(len(FINDINGS), bool)
    on[3] = True
    _, lab0 = _render(np.random.default_rng(2), 2, (64, 64), 1, REF2, off)
    _, lab1 = _render(np.random.default_rng(2), 2, (64, 64), 1, REF2, on)
    assert (lab1 == 1).sum() > 1.3 * (lab0 == 1).sum()
    assert ((lab0 == 1) & (lab1 != 1)).sum() == 0 or np.isin(lab1[(lab0 == 1) & (lab1 != 1)], (3, 4, 5)).all()


def test_fatty_liver_is_darker_than_the_spleen_whatever_the_enhancement() -> None:
    # Same anatomy with the finding forced off/on: only liver pixels change, and the liver goes
    # from brighter to darker than the spleen on CT, for patients with any contrast enhancement.
    fatty = FINDINGS.index("fatty_liver")
    off, on = np.zeros(len(FINDINGS), bool), np.zeros(len(FINDINGS), bool)
    on[fatty] = True
    for k in range(6):
        img0, lab0 = _render(np.random.default_rng(k), 2, (64, 64), 1, REF2, off, tissue_rng=np.random.default_rng([k, 1]))
        img1, lab1 = _render(np.random.default_rng(k), 2, (64, 64), 1, REF2, on, tissue_rng=np.random.default_rng([k, 1]))
        assert np.array_equal(lab0, lab1)
        changed = np.abs(img1 - img0)[0] > 1e-6
        # The liver's pixels, and its partial-volume rim where a neighbour's label wins.
        assert changed.sum() > 50 and (lab0[changed] == 1).mean() > 0.8
        core = lab0 == 1
        assert img0[0][core].mean() > img0[0][lab0 == 2].mean() > img1[0][core].mean()


def test_patient_variation_spreads_body_size_and_keeps_the_rest() -> None:
    def body_areas(variation: float) -> np.ndarray:
        cases = [generate_case(2, (48, 48), 1, REF2, 0, 0, i, patient_variation=variation) for i in range(30)]
        return np.array([(c.image[0] > 0.1).sum() for c in cases], float), cases

    areas1, cases1 = body_areas(1.0)
    areas3, cases3 = body_areas(3.0)
    assert areas3.std() > 2 * areas1.std()
    assert [c.findings.tolist() for c in cases1] == [c.findings.tolist() for c in cases3]  # same patients, other poses
    default = [generate_case(2, (48, 48), 1, REF2, 0, 0, i) for i in range(3)]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(default, cases1[:3]))


def test_multichannel_sequences_differ() -> None:
    case = generate_case(2, (48, 48), 4, REF2, 0, 0, 0)
    corr = np.corrcoef(case.image[:, case.label > 0])  # (4, 4) over organ voxels
    assert (corr[np.triu_indices(4, 1)] < 0.9).all()
    assert np.array_equal(generate_case(2, (48, 48), 1, REF2, 0, 0, 0).label, case.label)  # same anatomy


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(num_sites=2, cases_per_site=2, spatial_dims=4, shape=(32, 32)), "spatial_dims"),
        (dict(num_sites=2, cases_per_site=2, spatial_dims=3, shape=(32, 32)), "shape"),
        (dict(num_sites=2, cases_per_site=2, spatial_dims=2, shape=(32, 8)), "shape"),
        (dict(num_sites=2, cases_per_site=2, spatial_dims=2, shape=(32, 32), in_channels=0), "in_channels"),
        (dict(num_sites=0, cases_per_site=2, spatial_dims=2, shape=(32, 32)), "num_sites"),
        (dict(num_sites=2, cases_per_site=0, spatial_dims=2, shape=(32, 32)), "cases_per_site"),
        (dict(num_sites=2, cases_per_site=[3], spatial_dims=2, shape=(32, 32)), "cases_per_site"),
        (dict(num_sites=2, cases_per_site=2, spatial_dims=2, shape=(32, 32), heterogeneity=-1.0), "heterogeneity"),
        (dict(num_sites=2, cases_per_site=2, spatial_dims=2, shape=(32, 32), patient_variation=-1.0), "patient_variation"),
    ],
)
def test_validation(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        generate_hospitals(**kwargs)


def test_validation_case_and_site() -> None:
    with pytest.raises(ValueError, match="num_cases"):
        generate_site(0, 0, 2, (32, 32), 1, REF2, 0)
    with pytest.raises(ValueError, match="shape"):
        generate_case(2, (15, 32), 1, REF2, 0, 0, 0)
    with pytest.raises(ValueError, match="spatial_dims"):
        scanner_profiles(2, 1, 0)
    assert isinstance(REF2, Scanner)
