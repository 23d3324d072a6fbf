"""Fingerprints: stable digests of what determines a step's output."""

from __future__ import annotations

import hashlib
import json
from typing import Any

LENGTH = 16


def fingerprint(payload: Any) -> str:
    """A stable digest of a JSON-able payload (sorted keys, no whitespace)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:LENGTH]
