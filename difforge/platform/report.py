"""`difforge report`: the variants of a sweep (or the runs of an experiment) read back from MLflow
into a Markdown table and plots, logged back to MLflow.

One row per variant: its matrix values, then for each evaluation step its Fréchet distance,
precision, recall and class accuracy, the variant's wall time and the sampling rate. A step a
variant found cached reports the metrics of the run that computed it (same fingerprint). Plots:
each metric against each swept parameter that is not a seed, the mean over seeds with their
standard deviation as error bars, one line per combination of the other swept values.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difforge.platform.errors import DifforgeError


@dataclass
class Row:
    variant: str
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    from difforge.platform import settings

    return MlflowClient(uri or settings.default_tracking_uri())


def _children(client, exp_id: str, run_id: str) -> list[Any]:
    return client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=5000)


def collect(target: str, client) -> tuple[str, str | None, list[Row]]:
    """(title, run to log the report to, rows) for a sweep run id, a pipeline run id or an
    experiment name, read through an MLflow client."""
    variants: list[Any]
    log_to = None
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            run = client.get_run(target)
        except Exception:
            raise DifforgeError(f"no MLflow run {target} in {client.tracking_uri}") from None
        exp_id = run.info.experiment_id
        if run.data.tags.get("difforge.sweep") == "true":
            variants, log_to = _children(client, exp_id, target), target
        else:
            variants = [run]
        title = run.info.run_name or target
    else:
        exp = client.get_experiment_by_name(target)
        if exp is None:
            raise DifforgeError(
                f"no MLflow run or experiment named '{target}' in {client.tracking_uri}"
            )
        exp_id, title = exp.experiment_id, target
        runs = [
            r
            for r in client.search_runs([exp_id], max_results=5000)
            if r.data.tags.get("difforge.pipeline")
        ]
        variants = [r for r in runs if r.data.tags.get("difforge.variant")]
        if not variants:  # plain pipeline runs: those with no parent
            variants = [
                r
                for r in runs
                if "mlflow.parentRunId" not in r.data.tags
                and r.data.tags.get("difforge.sweep") != "true"
            ]
    if not variants:
        raise DifforgeError(f"{target}: no pipeline runs to report on")
    rows = []
    for v in sorted(variants, key=lambda r: r.info.start_time):
        name = v.data.tags.get("difforge.variant") or v.info.run_name or v.info.run_id
        params = {
            k.removeprefix("matrix."): val
            for k, val in v.data.params.items()
            if k.startswith("matrix.")
        }
        row = Row(name, v.info.run_id, params, {"seconds": v.data.metrics.get("seconds", math.nan)})
        for step in _children(client, exp_id, v.info.run_id):
            wanted = _report_metrics(step.data.tags.get("difforge.op", ""))
            if not wanted:
                continue  # the steps the report has columns for (a cached one costs a query)
            metrics = _computed_metrics(client, exp_id, step)
            sid = step.data.tags.get("difforge.step", "")
            for m in wanted:
                if m in metrics:
                    row.metrics[f"{sid}.{m}"] = metrics[m]
        rows.append(row)
    return title, log_to, rows


def _report_metrics(op: str) -> tuple[str, ...]:
    """The metrics an operator declares for reports (none for an operator not installed)."""
    from difforge.platform import registry

    cls = registry.find(op) if op else None
    return tuple(getattr(cls, "report_metrics", ()))


def _computed_metrics(client, exp_id: str, step) -> dict[str, float]:
    """A step's metrics; for a cached step, those of the run that computed its dataset."""
    if step.data.tags.get("difforge.cached") != "true":
        return dict(step.data.metrics)
    fp = step.data.tags.get("difforge.fingerprint")
    found = client.search_runs(
        [exp_id],
        f"tags.`difforge.fingerprint` = '{fp}' and tags.`difforge.cached` = 'false'",
        max_results=1,
    )
    return dict(found[0].data.metrics) if found else dict(step.data.metrics)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def _number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def plots(rows: list[Row], out: Path) -> list[Path]:
    """Each metric against each non-seed swept param; mean over seeds, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = sorted({k for r in rows for k in r.params})
    seeds = [k for k in swept if "seed" in k.rsplit(".", 1)[-1]]
    axes = [k for k in swept if k not in seeds]
    metrics = sorted({m for r in rows for m in r.metrics if m != "seconds"})
    files = []
    for param in axes:
        others = [k for k in axes if k != param]
        for metric in metrics:
            groups: dict[tuple, dict[str, list[float]]] = {}
            for r in rows:
                if metric not in r.metrics or math.isnan(r.metrics[metric]):
                    continue
                key = tuple(r.params.get(k, "-") for k in others)
                groups.setdefault(key, {}).setdefault(r.params.get(param, "-"), []).append(
                    r.metrics[metric]
                )
            if not groups:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.5))
            xs_all = sorted(
                {x for g in groups.values() for x in g},
                key=lambda v: (_number(v) is None, _number(v) or 0, v),
            )
            numeric = all(_number(x) is not None for x in xs_all)
            for key, by_x in sorted(groups.items()):
                xs = [x for x in xs_all if x in by_x]
                means = [statistics.mean(by_x[x]) for x in xs]
                errs = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
                pos = [_number(x) for x in xs] if numeric else [xs_all.index(x) for x in xs]
                label = ", ".join(
                    f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, key, strict=True)
                )
                ax.errorbar(pos, means, yerr=errs, marker="o", capsize=3, label=label or None)
            if not numeric:
                ax.set_xticks(range(len(xs_all)), xs_all)
            ax.set_xlabel(param)
            ax.set_ylabel(metric)
            n_seeds = max(len(v) for g in groups.values() for v in g.values())
            ax.set_title(
                f"{metric} (mean over {n_seeds} seed{'s' if n_seeds > 1 else ''})", fontsize=9
            )
            if others:
                ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{metric}_vs_{param.replace('.', '_')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files


def write_report(
    target: str, out: str | Path | None = None, tracking_uri: str | None = None, log: bool = True
) -> Path:
    """Write report.md and its plots into `out` (default ./reports/TITLE); log them to MLflow."""
    client = _client(tracking_uri)
    title, log_to, rows = collect(target, client)
    out = Path(out or Path("reports") / re.sub(r"[^A-Za-z0-9_.-]+", "-", title))
    out.mkdir(parents=True, exist_ok=True)
    params = sorted({k for r in rows for k in r.params})
    metrics = sorted({m for r in rows for m in r.metrics if m != "seconds"})
    head = ["variant", *params, *metrics, "seconds"]
    lines = [
        f"# {title}",
        "",
        f"{len(rows)} variants, read from MLflow ({client.tracking_uri}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r.variant,
            *(r.params.get(p, "-") for p in params),
            *(_fmt(r.metrics.get(m, math.nan)) for m in metrics),
            _fmt(r.metrics["seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    files = plots(rows, out)
    if files:
        lines += ["", "## Plots", ""] + [f"![{f.stem}]({f.name})" for f in files]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    if log:
        run_id = log_to
        if run_id is None:
            exp = client.get_experiment(client.get_run(rows[0].run_id).info.experiment_id)
            run_id = client.create_run(
                exp.experiment_id, run_name=f"report {title}", tags={"difforge.report": "true"}
            ).info.run_id
            client.set_terminated(run_id)
        client.log_artifacts(run_id, str(out), "report")
    return report


def main_table(path: Path) -> str:
    """The report's table (for printing)."""
    text = path.read_text().splitlines()
    return "\n".join(line for line in text if line.startswith("|"))


def headline(tracking_uri: str, run_id: str | None) -> tuple[list[str], str | None]:
    """What a run's console ends with: the metrics its evaluation steps declare
    (`report_metrics`; a cached step's from the run that computed it), as "step.metric value",
    and the pipeline run's page in the MLflow UI (the `difforge ui` address for a local store)."""
    if run_id is None:
        return [], None
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    exp_id = run.info.experiment_id
    lines = []
    for step in sorted(_children(client, exp_id, run_id), key=lambda r: r.info.start_time):
        op = step.data.tags.get("difforge.op", "")
        wanted = _report_metrics(op) if op.startswith("evaluate.") else ()
        if not wanted:
            continue
        metrics = _computed_metrics(client, exp_id, step)
        sid = step.data.tags.get("difforge.step", "")
        lines += [f"{sid}.{m} {_fmt(metrics[m])}" for m in wanted if m in metrics]
    from difforge.platform.tracking import ui_page

    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else UI_ADDRESS
    return lines, ui_page(base, f"experiments/{exp_id}/runs/{run_id}")


#: where `difforge ui` serves a local store
UI_ADDRESS = "http://127.0.0.1:5000"
