"""MLflow tracking: one parent run per pipeline run, one nested run per step.

Uses `MlflowClient` with explicit run ids rather than the fluent API's global active run, so
that workers can log to a step's run too. Secrets never reach params: the spec has no place for
them, and anything whose name looks like a credential is redacted anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difforge.platform import settings

if TYPE_CHECKING:
    import numpy as np
    from mlflow.tracking import MlflowClient

SECRET = re.compile(r"(secret|password|passwd|token|access_key|credential|api_key)", re.I)
MAX_PARAM = 6000


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = "***" if SECRET.search(str(k)) else json.dumps(v, default=str)
            out[key] = text[:MAX_PARAM]
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialize the first touch of a SQLite store: MLflow creates its tables on first use, and
    two runs starting together (two scheduled runs, say) would both try, and one would fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


class StepTracker:
    """Logs to one step's MLflow run. Picklable by its (uri, run_id), so workers can log too."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self._c: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "_c": None, "_last": {}}

    @property
    def client(self) -> MlflowClient:
        if self._c is None:
            self._c = _client(self.uri)
        return self._c

    def log_params(self, params: dict[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        flat = flatten(params, prefix)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_new(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics for `step` unless that step was logged before. Training after a failure
        replays steps from its last checkpoint, and MLflow cannot delete points: so a replayed
        step is never logged twice, whether or not its checkpoint was registered in time."""
        last = self.__dict__.setdefault("_last", {})
        fresh = {}
        for key, value in metrics.items():
            if key not in last:
                history = self.client.get_metric_history(self.run_id, key)
                last[key] = max((m.step for m in history), default=-1)
            if step > last[key]:
                fresh[key] = value
                last[key] = step
        if fresh:
            self.log_metrics(fresh, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            if v is not None:
                self.client.set_tag(self.run_id, k, str(v))

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_image(self, image: np.ndarray | Any, name: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=name)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class Tracker:
    """The pipeline run and its nested step runs."""

    def __init__(self, uri: str | None, experiment: str):
        self.uri = uri or settings.default_tracking_uri()
        if "://" not in self.uri and not self.uri.startswith("sqlite:"):
            self.uri = Path(self.uri).expanduser().resolve().as_uri()
        self.experiment = experiment
        with _store_lock(self.uri):
            self.client = _client(self.uri)
            self.experiment_id = self._experiment_id()
        self.run: StepTracker | None = None

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if is_local_store(self.uri):
            # Set explicitly, or artifacts land in ./mlruns of whatever the current folder is.
            location = (settings.default_artifact_root() / self.experiment).as_uri()
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except Exception:
            # another process created it between our look-up and create
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def start_pipeline(self, name: str, tags: dict[str, Any]) -> StepTracker:
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={k: str(v) for k, v in tags.items() if v is not None},
        )
        self.run = StepTracker(self.uri, run.info.run_id)
        return self.run

    def start_step(self, name: str, tags: dict[str, Any]) -> StepTracker:
        assert self.run is not None
        all_tags = {"mlflow.parentRunId": self.run.run_id, **tags}
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={k: str(v) for k, v in all_tags.items() if v is not None},
        )
        return StepTracker(self.uri, run.info.run_id)

    def log_files(self, run: StepTracker, files: dict[str, str | bytes]) -> None:
        """Log small in-memory files as artifacts of a run."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                mode = "wb" if isinstance(content, bytes) else "w"
                with open(path, mode) as f:
                    f.write(content)
            run.log_artifacts(tmp)

    def run_url(self, run_id: str) -> str | None:
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return None
