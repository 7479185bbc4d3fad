"""Shared test settings."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _fast_torch():
    # Two threads at most: the CI machine has two cores, and tests must not fight over them.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(autouse=True)
def _fedmae_logs_reach_caplog():
    # An in-process Flower run (server/app.py, sites/app.py) routes fedmae's logger to Flower's
    # console handler and stops propagation, as it must inside Flower's processes; a later
    # test's caplog would then see nothing. Each test starts with the logger as Python made it.
    logger = logging.getLogger("fedmae")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = state[0], state[1], state[2]
