"""Test configuration: deterministic hypothesis profiles, internal checks on, spec fixtures."""

from __future__ import annotations

import glob
import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("RNNC_CHECKS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = sorted(glob.glob(os.path.join(ROOT, "specs", "*.rnn")))

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
settings.register_profile(
    "dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=SPECS, ids=[os.path.basename(s) for s in SPECS])
def spec(request) -> str:
    return request.param
