"""Fixtures shared by several test files."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI replays the same examples on every run (``.ci/run`` passes ``--hypothesis-profile=ci``), so a
# red CI always means a change broke something; a plain ``pytest`` draws new examples each run
# and keeps exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)

NO_POSTGRES = (
    "no PostgreSQL server: set DYNAS_TEST_POSTGRES_URL=postgresql://USER@HOST:PORT/DB "
    "(.ci/run starts one with .ci/postgres)"
)


@pytest.fixture
def postgres_url() -> str:
    """The test PostgreSQL server's URL (``DYNAS_TEST_POSTGRES_URL``).

    Without one the test skips and says why, or fails when ``DYNAS_REQUIRE_POSTGRES`` is set
    (``.ci/run`` sets it, so CI cannot pass without running these tests).
    """
    url = os.environ.get("DYNAS_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("DYNAS_REQUIRE_POSTGRES"):
            pytest.fail(f"DYNAS_REQUIRE_POSTGRES is set but there is {NO_POSTGRES}")
        pytest.skip(NO_POSTGRES)
    return url


@pytest.fixture
def fold_from_64_rows(monkeypatch):
    """Row products fold from 64 rows in the kernels and the CPU work model (the rule of a host
    where oneDNN's 1x1 convolution beats the BLAS product), with the model's memoised work
    cleared before and after."""
    from dynas.kernels import convs
    from dynas.predictors import cpu, cpu_paths

    cpu.clear_work_caches()
    for mod in (convs, cpu_paths):
        monkeypatch.setattr(mod, "FOLD_MIN_ROWS", 64)
    yield
    monkeypatch.undo()
    cpu.clear_work_caches()
