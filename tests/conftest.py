"""Test configuration: deterministic hypothesis profiles, internal checks on, spec fixtures."""

from __future__ import annotations

import glob
import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("RNNC_CHECKS", "1")
# the suite checks the NumPy target, the readable reference, wherever a test names no target;
# tests/test_native.py checks the native target (the default outside the tests) against it on
# every spec, and `RNNC_TARGET=native python -m pytest` runs the whole suite on it
os.environ.setdefault("RNNC_TARGET", "numpy")
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
