"""A pipeline with a `matrix:`: variants expanded with include/exclude, shared steps computed
once, variants nested in MLflow with their values as params, and `difforge report` reading them
back into a table and plots."""

from __future__ import annotations

import textwrap

from mlflow.tracking import MlflowClient

import difforge
from tests.conftest import difforge_cli

SWEEP = """
# difforge run sweep.yaml
name: sweep
storage: {storage}
tracking: {{experiment: sweep-tests}}
matrix:
  noisy.params.corruption_ratio: [0.0, 0.3]
  noisy.params.seed: [0, 1]
  exclude: [{{noisy.params.corruption_ratio: 0.0, noisy.params.seed: 1}}]
  include: [{{noisy.params.corruption_ratio: 0.6, noisy.params.seed: 0}}]
steps:
  - id: raw
    op: ingest.digits
  - id: test
    op: ingest.digits
    params: {{split: test}}
  - id: clf
    op: train.classifier
    inputs: [raw, test]
    params: {{epochs: 2, batch_size: 64}}
  - id: noisy
    op: corrupt.labels
    inputs: [test]
  - id: quality
    op: evaluate.fid
    inputs: [noisy, test, clf]
    params: {{kid_subset_size: 50}}
"""


def test_sweep_shares_steps_and_reports(ray_session, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(SWEEP).format(storage=tmp_path / "s").lstrip())
    shown = difforge_cli("validate", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "sweep sweep: 4 variants" in shown.stdout
    for step in ("raw", "test", "clf"):
        assert any(
            line.split()[:1] == [step] and "shared by all 4" in line
            for line in shown.stdout.splitlines()
        ), shown.stdout
    assert any(
        line.split()[:1] == ["noisy"] and "4 distinct" in line for line in shown.stdout.splitlines()
    )

    result = difforge.sweep(str(path))
    assert list(result.variants) == [
        "corruption_ratio=0.0,seed=0",
        "corruption_ratio=0.3,seed=0",
        "corruption_ratio=0.3,seed=1",
        "corruption_ratio=0.6,seed=0",
    ]
    computed = [name for name, s in result.variants.items() if not s.step("clf").cached]
    assert computed == ["corruption_ratio=0.0,seed=0"]  # the classifier trained once

    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("sweep-tests")
    variants = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(variants) == 4
    params = {r.data.params["matrix.noisy.params.corruption_ratio"] for r in variants}
    assert params == {"0.0", "0.3", "0.6"}

    out = difforge_cli("report", result.run_id, "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| corruption_ratio=")]
    assert len(rows) == 4 and "quality.class_accuracy" in report
    # labels flipped at 30% and 60%: the classifier agrees with them less, in order
    head = next(x for x in report.splitlines() if x.startswith("| variant"))
    head = [c.strip() for c in head.strip("|").split("|")]
    acc = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        ratio = cells[head.index("noisy.params.corruption_ratio")]
        acc[ratio] = float(cells[head.index("quality.class_accuracy")])
    assert acc["0.0"] > acc["0.3"] > acc["0.6"]
    assert (
        tmp_path / "report" / "quality.class_accuracy_vs_noisy_params_corruption_ratio.png"
    ).exists()
    logged = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert "report/report.md" in logged
