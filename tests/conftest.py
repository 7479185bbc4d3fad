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


# fedmae's logger as Python made it, taken once before any test or fixture ran.
_FEDMAE_LOGGER = logging.getLogger("fedmae")
_PRISTINE = (list(_FEDMAE_LOGGER.handlers), _FEDMAE_LOGGER.propagate, _FEDMAE_LOGGER.level)


@pytest.fixture(autouse=True)
def _fedmae_logs_reach_caplog():
    # An in-process Flower run (server/app.py, sites/app.py) routes fedmae's logger to Flower's
    # console handler and stops propagation, as it must inside Flower's processes; a later
    # test's caplog would then see nothing. Each test starts and ends with the logger as Python
    # made it: taken at import, since a module-scoped fixture may run Flower before this one.
    _FEDMAE_LOGGER.handlers[:], _FEDMAE_LOGGER.propagate, _FEDMAE_LOGGER.level = list(_PRISTINE[0]), *_PRISTINE[1:]
    yield
    _FEDMAE_LOGGER.handlers[:], _FEDMAE_LOGGER.propagate, _FEDMAE_LOGGER.level = list(_PRISTINE[0]), *_PRISTINE[1:]
