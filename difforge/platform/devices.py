"""Which class of device `auto` precisions resolve for, known when a run is planned.

`dtype: auto` and `precision: auto` mean bfloat16 on GPUs and float32 on CPUs, so they do not
describe what runs until the device is known; the plan adds the device class to the fingerprint
of every step that uses them, and the manifest records the device a step ran on. The class is
found without starting Ray or importing torch: CUDA devices visible to this process, or
`DIFFORGE_DEVICE_CLASS` (for a driver without GPUs whose workers have them).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from difforge.platform.errors import DifforgeError

CLASSES = ("cpu", "cuda")


def device_class() -> str:
    forced = os.environ.get("DIFFORGE_DEVICE_CLASS", "").strip().lower()
    if forced:
        if forced not in CLASSES:
            raise DifforgeError(f"DIFFORGE_DEVICE_CLASS={forced!r}: one of {', '.join(CLASSES)}")
        return forced
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    return "cuda" if glob.glob("/dev/nvidia[0-9]*") else "cpu"


def uses_auto_precision(params: Any) -> bool:
    """Does a step's params (a JSON-able tree) leave a `dtype` or `precision` to `auto`?"""
    if isinstance(params, dict):
        return any(
            (k in ("dtype", "precision") and v == "auto") or uses_auto_precision(v)
            for k, v in params.items()
        )
    if isinstance(params, list):
        return any(uses_auto_precision(v) for v in params)
    return False
