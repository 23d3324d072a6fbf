"""MLflow tracking: one parent run per pipeline run, one nested run per step.

Uses `MlflowClient` with explicit run ids rather than the fluent API's global active run, so
that workers can log to a step's run too. Secrets never reach params: the spec has no place for
them, and anything whose name looks like a credential is redacted anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difforge.platform import settings
from difforge.platform.errors import DifforgeError
from difforge.platform.events import RunObserver, StepLog
from difforge.platform.progress import PROGRESS_EVERY_S, PROGRESS_METRIC, quiet_libraries
from difforge.platform.watchdog import Heartbeat, process_identity, reap_dead_runs

if TYPE_CHECKING:
    import numpy as np
    from mlflow.tracking import MlflowClient

    from difforge.platform.plan import Plan, PlannedStep

log = logging.getLogger("difforge")

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

    # importing MLflow set its loggers up; a driver sends them back to its log file before
    # the store's first use logs its schema set-up
    quiet_libraries(only_again=True)
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
        unknown = [key for key in metrics if key not in last]
        if unknown:  # one query says which have points at all (none, in a fresh run)
            logged = set(self.client.get_run(self.run_id).data.metrics)
            for key in unknown:
                history = self.client.get_metric_history(self.run_id, key) if key in logged else []
                last[key] = max((m.step for m in history), default=-1)
        fresh = {}
        for key, value in metrics.items():
            if step > last[key]:
                fresh[key] = value
                last[key] = step
        if fresh:
            self.log_metrics(fresh, step)

    def log_progress(self, step: int, loss: Any) -> None:
        now = time.time()
        if now - self.__dict__.get("_beat", -PROGRESS_EVERY_S) >= PROGRESS_EVERY_S:
            self._beat = now
            try:  # a device tensor is read (and the device waited for) only here
                self.log_metrics({PROGRESS_METRIC: float(loss)}, step)
            except Exception:  # noqa: BLE001 - a heartbeat never stops training (a busy store)
                log.debug("heartbeat at step %d not logged", step, exc_info=True)

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

    def log_image_at(self, image: np.ndarray | Any, key: str, step: int) -> None:
        # MLflow files a series' images as images/<key>+step+<step>+...: one listing says
        # whether this step has one (MLflow cannot delete a logged image)
        prefix = f"{key.replace('/', '~')}+step+{step}+"
        logged = self.client.list_artifacts(self.run_id, "images")
        if not any(f.path.rsplit("/", 1)[-1].startswith(prefix) for f in logged):
            self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def register_model(
        self,
        name: str,
        folder: str,
        kind: str = "diffusion",
        metrics: dict[str, float] | None = None,
        description: str | None = None,
    ) -> str | None:
        """A new version of registered model `name`: the local `folder` (an MLflow model, or a
        plain model folder) logged as an MLflow logged model of this run (its source run),
        the version tagged with the run's lineage (pipeline, step, inputs, dataset), its kind
        and figures; its description the model card (`model_card`), `description` (how to
        use it) last."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(self.run_id)
        tags = run.data.tags
        lineage = {
            "pipeline": tags.get("difforge.pipeline", ""),
            "step": tags.get("difforge.step", ""),
            "inputs": tags.get("difforge.inputs", ""),
            "dataset": tags.get("difforge.uri", ""),
            "kind": kind,
        }
        figures = {f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()}
        logged = self.client.create_logged_model(
            run.info.experiment_id,
            name=lineage["step"] or name,
            source_run_id=self.run_id,
            tags={f"difforge.{k}": v for k, v in lineage.items()},
            model_type=kind,
        )
        self.client.log_model_artifacts(logged.model_id, folder)
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already there
        version = self.client.create_model_version(
            name,
            logged.artifact_location,  # (models:/ID would be looked up in the default store)
            run_id=self.run_id,
            tags={**lineage, **figures},
            model_id=logged.model_id,
        )
        ref = f"models:/{name}/{version.version}"
        usage = description.replace("{ref}", ref) if description else None
        card = model_card(name, run, {**run.data.metrics, **(metrics or {})}, usage)
        self.client.update_model_version(name, version.version, description=card)
        # the logged model's page links to the version, as MLflow's own registration does
        link = [{"name": name, "version": version.version}]
        self.client.set_logged_model_tags(
            logged.model_id, {"mlflow.modelVersions": json.dumps(link)}
        )
        self.set_tags({"difforge.registered_model": ref})
        return ref

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def ui_page(base: str, page: str) -> str:
    """The address of a page of MLflow's UI at `base` (`experiments/1/runs/ID`, say), in its
    model-training view: MLflow 3.17's UI opens every experiment in its GenAI view unless the
    address asks for the other (the experimentKind tag decides only where that toggle is off)."""
    return f"{base.rstrip('/')}/#/{page}?workflowType=machine_learning"


def model_card(name: str, run: Any, metrics: dict[str, float], usage: str | None) -> str:
    """A registered version's description (Markdown): what made it (step, operator, pipeline,
    commit), the data it read (URIs and fingerprints), its recipe (the step's params) and its
    figures at registration."""
    tags, params = run.data.tags, run.data.params
    made = (
        f"**{name}**: step `{tags.get('difforge.step', '?')}` (`{tags.get('difforge.op', '?')}` "
        f"v{tags.get('difforge.op_version', '?')}) of pipeline `{tags.get('difforge.pipeline', '?')}`"
        f", run `{run.info.run_id}`"
    )
    if tags.get("mlflow.source.git.commit"):
        made += f", git commit `{tags['mlflow.source.git.commit'][:12]}`"
    lines = [made + ".", ""]
    ours = [d.dataset for d in run.inputs.dataset_inputs if d.dataset.source_type == "difforge"]
    read = {d.name: json.loads(d.source).get("uri") for d in ours}
    inputs = json.loads(tags.get("difforge.inputs") or "{}")
    lines.append("Data:")
    for ref, fingerprint in inputs.items():
        where = f", `{read[ref]}`" if read.get(ref) else ""
        lines.append(f"- `{ref}` (fingerprint `{fingerprint}`{where})")
    if tags.get("difforge.uri"):
        lines.append(f"- written to `{tags['difforge.uri']}`")
    recipe = ", ".join(f"`{k}={v}`" for k, v in sorted(params.items()))
    lines += ["", f"Recipe: {recipe[:MAX_PARAM] or 'defaults'}.", ""]
    figures = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if not k.startswith("_"))
    lines.append(f"Figures at registration: {figures or 'none yet'}.")
    if usage:
        lines += ["", usage]
    return "\n".join(lines)


def unreachable(uri: str, exc: BaseException) -> None:
    """Raise a short DifforgeError where `exc` says an MLflow server could not be reached
    (refused, timed out, no such host): the address tried and what to do, no traceback."""
    text = str(exc)
    signs = ("Failed to establish a new connection", "Max retries exceeded", "timed out")
    if uri.startswith(("http://", "https://")) and any(sign in text for sign in signs):
        why = "connection refused" if "refused" in text else "no answer"
        raise DifforgeError(
            f"cannot reach the MLflow tracking server at {uri} ({why}): start it (`mlflow "
            "server`, or `infra/local/up.sh`), or point tracking.uri / MLFLOW_TRACKING_URI at "
            "one that runs; without either, runs track to SQLite in DIFFORGE_HOME"
        ) from None


# Arrow's types as MLflow's column types (its UI shows a dataset's schema in these)
_MLFLOW_TYPES = {
    "string": "string",
    "large_string": "string",
    "binary": "binary",
    "bool": "boolean",
}
_MLFLOW_TYPES.update(large_binary="binary", int32="integer", int64="long", double="double")
_MLFLOW_TYPES.update(float="float", int8="integer", int16="integer", uint8="integer")


def dataset_inputs(step: PlannedStep, known: set[str] | frozenset = frozenset()) -> list:
    """A step's inputs as MLflow datasets (its Datasets panel): name, the fingerprint as
    digest, the URI as source, the schema and a profile with the row count; context `input`.
    Each step's output so shows as the next step's input. An input whose manifest cannot be
    read now (an upstream step's in the same fused pass, not yet committed) is left out, as
    are those named `known` (logged already)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from difforge.platform.datasets import read_manifest

    out = []
    for ref in step.inputs:
        if ref.text in known:
            continue
        try:
            manifest = read_manifest(ref.uri)
        except Exception:  # noqa: BLE001 - not committed yet: nothing to show
            continue
        columns = [
            {"name": c["name"], "type": _MLFLOW_TYPES.get(c["type"], "string")}
            for c in manifest.columns
        ]
        dataset = Dataset(
            name=ref.text,
            digest=manifest.fingerprint,
            source_type="difforge",
            source=json.dumps({"uri": ref.uri}),
            schema=json.dumps({"mlflow_colspec": columns}),
            profile=json.dumps({"num_rows": manifest.num_rows, "files": len(manifest.files)}),
        )
        out.append(DatasetInput(dataset, [InputTag("mlflow.data.context", "input")]))
    return out


# what difforge's experiments are: MLflow's UI opens one of this kind on its runs (not on
# GenAI's traces and judges) where its view toggle is off; 3.17's is on, hence `ui_page`
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class Tracker:
    """The pipeline run and its nested step runs."""

    def __init__(self, uri: str | None, experiment: str):
        self.uri = uri or settings.default_tracking_uri()
        if "://" not in self.uri and not self.uri.startswith("sqlite:"):
            self.uri = Path(self.uri).expanduser().resolve().as_uri()
        self.experiment = experiment
        with _store_lock(self.uri):
            self.client = _client(self.uri)
            try:
                self.experiment_id = self._experiment_id()
            except Exception as exc:
                unreachable(self.uri, exc)
                raise
        self.run: StepTracker | None = None

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made before difforge said so
                self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if is_local_store(self.uri):
            # Set explicitly, or artifacts land in ./mlruns of whatever the current folder is.
            location = (settings.default_artifact_root() / self.experiment).as_uri()
        try:
            return self.client.create_experiment(
                self.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
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


class MlflowObserver(RunObserver):
    """Tracks a run in MLflow: one parent run for the pipeline (its settings as params, the
    resolved plan and YAML as artifacts) and one nested run per step (tags for its lineage,
    params, metrics, manifest). Runs of the experiment whose driver is provably dead are
    marked FAILED when a new run starts."""

    def __init__(self, uri: str | None, experiment: str, tags: dict[str, Any]):
        self.uri_setting, self.experiment, self.tags = uri, experiment, tags
        self.tracker: Tracker | None = None
        self.parent: StepTracker | None = None
        self.heartbeat: Heartbeat | None = None
        self.steps: dict[str, StepTracker] = {}
        self.inputs_logged: dict[str, set[str]] = {}
        self.pipeline = ""
        self.source: dict[str, str | None] = {}

    @property
    def uri(self) -> str:
        return self.tracker.uri if self.tracker else (self.uri_setting or "")

    @property
    def run_id(self) -> str | None:
        return self.parent.run_id if self.parent else None

    def pipeline_started(self, plan: Plan, params: dict[str, Any], files: dict[str, str]) -> None:
        self.tracker = tracker = Tracker(self.uri_setting, self.experiment)
        self.pipeline = plan.name
        try:  # runs whose driver was killed would otherwise stay RUNNING forever
            for dead in reap_dead_runs(tracker.client, tracker.experiment_id):
                log.info("run %s: its driver is gone; marked FAILED", dead)
        except Exception as exc:  # noqa: BLE001 - housekeeping never fails a run
            log.debug("could not check for dead runs: %s", exc)
        commit = git_commit()
        self.source = {  # MLflow's "Source": the pipeline file, and the commit it was run at
            "mlflow.source.name": self.tags.get("difforge.file") or plan.name,
            "mlflow.source.type": "JOB" if "difforge.job_id" in self.tags else "LOCAL",
            "mlflow.source.git.commit": commit,
        }
        steps = ", ".join(f"{s.id} ({s.op})" for s in plan.steps)
        self.parent = tracker.start_pipeline(
            plan.name,
            {
                **process_identity(),
                **self.source,
                "mlflow.note.content": f"difforge pipeline `{plan.name}`, storage "
                f"{plan.storage}: {len(plan.steps)} steps, {steps}.",
                "difforge.pipeline": plan.name,
                "difforge.storage": plan.storage,
                "difforge.git_commit": commit,
                **self.tags,
            },
        )
        self.heartbeat = Heartbeat(tracker.client, self.parent.run_id)  # it is alive
        self.parent.log_params(
            {**params, **{f"fingerprint.{s.id}": s.fingerprint for s in plan.steps}}
        )
        tracker.log_files(self.parent, files)

    def _tags(self, step: PlannedStep) -> dict[str, str]:
        reads = ", ".join(r.text for r in step.inputs) or "no input (a source)"
        return {
            **self.source,
            "mlflow.note.content": f"`{step.op}` v{step.op_cls.version}: "
            f"{step.op_cls.description()} Reads {reads}; writes {step.uri}.",
            "difforge.pipeline": self.pipeline,
            "difforge.step": step.id,
            "difforge.op": step.op,
            "difforge.op_version": step.op_cls.version,
            "difforge.fingerprint": step.fingerprint,
            "difforge.inputs": json.dumps({r.text: r.fingerprint for r in step.inputs}),
            "difforge.uri": step.uri,
        }

    def _log_inputs(self, step: PlannedStep, run_id: str, known=frozenset()) -> set[str]:
        """Log the step's committed inputs not `known`; return the names of all it has."""
        assert self.tracker is not None
        inputs = dataset_inputs(step, known)
        if inputs:
            self.tracker.client.log_inputs(run_id, datasets=inputs)
        return {*known, *(i.dataset.name for i in inputs)}

    def step_cached(self, step: PlannedStep, rows: int) -> str | None:
        assert self.tracker is not None
        run = self.tracker.start_step(step.id, {**self._tags(step), "difforge.cached": "true"})
        self._log_inputs(step, run.run_id)
        run.log_metrics({"rows_out": rows, "cached": 1})
        run.end()
        return run.run_id

    def step_started(self, step: PlannedStep, fused_with: list[str]) -> StepLog:
        assert self.tracker is not None
        tags = {**self._tags(step), "difforge.cached": "false"}
        if len(fused_with) > 1:
            tags["difforge.pass"] = "+".join(fused_with)
        run = self.steps[step.id] = self.tracker.start_step(step.id, tags)
        try:
            self.inputs_logged[step.id] = self._log_inputs(step, run.run_id)
            run.log_params(step.params.model_dump(mode="json"), prefix="")
        except BaseException:
            run.end("FAILED")
            raise
        return run

    def step_finished(
        self, step: PlannedStep, metrics: dict[str, float], manifest: dict[str, Any]
    ) -> None:
        run = self.steps.pop(step.id)
        # inputs from the same fused pass are committed now
        self._log_inputs(step, run.run_id, self.inputs_logged.pop(step.id, frozenset()))
        run.log_metrics(metrics)
        run.log_dict(manifest, "manifest.json")
        nodes = manifest.get("producer", {}).get("nodes")
        if nodes:  # where its work ran
            run.set_tags({"difforge.nodes": ",".join(nodes)})
        run.end()

    def step_ended(self, step: PlannedStep, status: str) -> None:
        run = self.steps.pop(step.id, None)
        if run is not None:
            run.end(status)

    def pipeline_ended(self, status: str, metrics: dict[str, float]) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.parent is not None:
            self.parent.log_metrics(metrics)
            self.parent.end(status)
