"""Experiment tracking: a run's curves, federated rounds and a comparison's outcome, in TensorBoard or
MLflow (``tracking.backend``). ``trackers`` is where the figures go; ``records`` is which figures,
taken from the records a run writes anyway. See docs/tracking.md."""

from fedmae.tracking.records import TrackedRounds, epoch_metrics, log_comparison, report_metrics, validation_metrics
from fedmae.tracking.trackers import (
    NoTracker,
    Tracker,
    TrackingError,
    check_tracking,
    for_nested_run,
    open_tracker,
    prepare_store,
)

__all__ = ["NoTracker", "TrackedRounds", "Tracker", "TrackingError", "check_tracking", "epoch_metrics",
           "for_nested_run", "log_comparison", "open_tracker", "prepare_store", "report_metrics", "validation_metrics"]
