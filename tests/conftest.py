"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so a run's verdict is reproducible (a
# failing draw fails every time and gets fixed, rather than breaking one CI run in many);
# HYPOTHESIS_PROFILE=explore draws afresh on each run.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny batched solves: one thread is faster and keeps a file's runtime predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
