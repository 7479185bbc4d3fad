"""The metrics type: its JSON, flat (wire) and table forms, and the example-weighted mean over sites."""

from __future__ import annotations

import json
import math

import pytest

from fedmae.metrics import Metrics, format_table, format_value, metrics_table, weighted_mean

SEGMENTATION = Metrics("mean_dice", {"mean_dice": 0.5, "mean_hd95": 3.0},
                       {"dice": {"liver": 0.75, "spleen": 0.25}, "hd95": {"liver": 2.0, "spleen": 4.0}}, 4)
UNDEFINED_CLASS = Metrics("mean_auc", {"mean_auc": 1.0}, {"auc": {"lesion": 1.0, "cyst": None}}, 2)


def test_json_form_is_the_report_layout_and_reads_back():
    text = json.dumps(SEGMENTATION.to_json())
    assert text == ('{"main": "mean_dice", "cases": 4, "mean_dice": 0.5, "per_class": {"dice": {"liver": 0.75, '
                    '"spleen": 0.25}, "hd95": {"liver": 2.0, "spleen": 4.0}}, "mean_hd95": 3.0}')
    assert Metrics.from_json(json.loads(text)) == SEGMENTATION


def test_flat_form_holds_the_main_value_twice_per_class_scores_and_the_weight():
    flat = UNDEFINED_CLASS.flat()
    assert list(flat) == ["main", "mean_auc", "auc/lesion", "auc/cyst", "num-examples"]
    assert flat["main"] == flat["mean_auc"] == 1.0 and math.isnan(flat["auc/cyst"]) and flat["num-examples"] == 2.0
    assert "mean_hd95" not in SEGMENTATION.flat()  # only the main headline value leaves a site


@pytest.mark.parametrize("undefined", [math.nan, None])  # None: a flat form read back from JSON
def test_flat_form_reads_back_with_the_main_metric_named_by_the_reader(undefined):
    flat = {**UNDEFINED_CLASS.flat(), "auc/cyst": undefined}
    assert Metrics.from_flat(flat, "mean_auc") == UNDEFINED_CLASS


def test_flat_form_without_its_main_metric_is_refused_unless_the_site_had_no_cases():
    with pytest.raises(ValueError, match="without their main metric 'accuracy'"):
        Metrics.from_flat(UNDEFINED_CLASS.flat(), "accuracy")
    empty = Metrics.from_flat({"num-examples": 0}, "mean_auc")
    assert empty.main_value is None and empty.cases == 0


def test_mean_weights_sites_by_cases_skips_undefined_values_and_matches_the_flat_mean():
    other = Metrics("mean_auc", {"mean_auc": 0.5}, {"auc": {"lesion": 0.0, "cyst": 0.5}}, 6)
    empty = Metrics.from_flat({"num-examples": 0}, "mean_auc")
    pooled = Metrics.mean([UNDEFINED_CLASS, other, empty])
    assert pooled.main_value == pytest.approx((1.0 * 2 + 0.5 * 6) / 8)
    assert pooled.per_class == {"auc": {"cyst": 0.5, "lesion": pytest.approx(0.25)}} and pooled.cases == 8
    flats = [m.flat() for m in (UNDEFINED_CLASS, other, empty)]
    assert pooled.flat() == weighted_mean(flats)  # the same numbers, to the bit, as the wire-level mean


def test_mean_refuses_metrics_with_different_main_metrics():
    with pytest.raises(ValueError, match="one main metric"):
        Metrics.mean([UNDEFINED_CLASS, SEGMENTATION])


def test_weighted_mean_of_a_value_undefined_everywhere_is_nan():
    mean = weighted_mean([{"val_loss": math.nan, "num-examples": 3}])
    assert math.isnan(mean["val_loss"]) and mean["num-examples"] == 3.0


def test_table_shows_the_main_metric_and_the_first_kind_per_class():
    table = metrics_table({"pooled": SEGMENTATION, "site-0": UNDEFINED_CLASS}, split="val")
    assert table.splitlines() == ["        val mean_dice  dice liver  dice spleen",
                                  "pooled  0.500          0.750       0.250      ",
                                  "site-0  n/a            n/a         n/a        "]


def test_values_and_tables_format_one_way():
    assert [format_value(v) for v in (0.61249, None, math.nan)] == ["0.612", "n/a", "n/a"]
    assert format_value(12.4, digits=0) == "12"
    assert format_table(["a", "b"], [["1", "22"]], markdown=True) == "| a | b |\n| --- | --- |\n| 1 | 22 |"
