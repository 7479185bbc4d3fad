"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fast_torch():
    # Two threads at most: the CI machine has two cores, and tests must not fight over them.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
