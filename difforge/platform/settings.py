"""Where local state lives. Nothing here is ever on S3, whatever the storage root is."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """`DIFFORGE_HOME`: the MLflow SQLite store, its artifacts and local caches (default ~/.difforge)."""
    path = Path(os.environ.get("DIFFORGE_HOME", "~/.difforge")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return home() / "mlartifacts"
