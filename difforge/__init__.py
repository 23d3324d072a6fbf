"""difforge: declarative pipelines for the whole life of a diffusion model.

The public surface is small: `run`, `plan`, `open_dataset`, `load_spec`. Heavy libraries
(torch, Ray, MLflow) are imported only when something needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difforge._version import __version__

__all__ = ["__version__", "load_spec", "open_dataset", "plan", "run", "sweep"]

if TYPE_CHECKING:
    from difforge.platform.datasets import open_dataset
    from difforge.platform.executor import run
    from difforge.platform.spec import load_spec


def plan(source: Any, overrides: list[str] | None = None, **kwargs: Any):
    """Validate a pipeline and resolve its plan (fingerprints, cache state) without running it."""
    from difforge.platform.plan import build_plan
    from difforge.platform.spec import load_spec

    return build_plan(load_spec(source, overrides), **kwargs)


def sweep(source: Any, overrides: list[str] | None = None, **kwargs: Any):
    """Run every variant of a pipeline's `matrix:`; returns a SweepSummary."""
    from difforge.platform.sweep import load_sweep, run_sweep

    loaded = load_sweep(source, overrides)
    if loaded is None:
        raise ValueError("this pipeline declares no matrix: use difforge.run")
    return run_sweep(loaded, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "run":
        from difforge.platform.executor import run

        return run
    if name == "open_dataset":
        from difforge.platform.datasets import open_dataset

        return open_dataset
    if name == "load_spec":
        from difforge.platform.spec import load_spec

        return load_spec
    raise AttributeError(f"module 'difforge' has no attribute {name!r}")
