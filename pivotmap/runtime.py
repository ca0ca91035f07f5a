"""Process-wide defaults that keep pivotmap offline and quiet unless the user says otherwise."""

import os

OFFLINE_DEFAULTS = {
    # Prefect: the temporary local server needs more than the 20 s default on a cold database.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # MLflow and friends: no telemetry ("true", the word, is what DO_NOT_TRACK expects).
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    # GDAL: no directory listings on remote opens.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}


def apply_offline_defaults() -> None:
    """Set every default the user has not set; called once at each entry point."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
