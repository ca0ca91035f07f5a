"""Shared fixtures: offline settings, the real data folder, one Prefect server per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from pivotmap.runtime import apply_offline_defaults

apply_offline_defaults()
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REALDATA = SHARED / "realdata"
FLANDERS = REALDATA / "flanders-31UDS-2018"
SCHEMAS = SHARED / "stac-schemas"


@pytest.fixture(scope="session")
def flanders() -> Path:
    if not (FLANDERS / "catalog.json").is_file():
        pytest.skip(f"real data not found at {FLANDERS}")
    return FLANDERS


@pytest.fixture(scope="session")
def schema_dir() -> Path:
    if not (SCHEMAS / "index.json").is_file():
        pytest.skip(f"STAC schemas not found at {SCHEMAS}")
    return SCHEMAS


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (each costs ~20-30 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
