"""The same pipeline with its storage on a real S3 server and tracking on a real MLflow server."""

from __future__ import annotations

import uuid

import s3fs
from mlflow.tracking import MlflowClient

import difforge

SMALL = {
    "name": "small",
    "steps": [
        {"id": "raw", "op": "ingest.digits", "params": {"limit": 400}},
        {"id": "small", "op": "image.resize", "inputs": ["raw"], "params": {"size": 12}},
    ],
}


def test_storage_on_s3(ray_session, s3_server, tmp_path):
    root = f"s3://datasets/{uuid.uuid4().hex[:8]}"
    spec = {**SMALL, "storage": root, "tracking": {"experiment": "s3-test"}}
    summary = difforge.run(spec)
    assert [s.rows_out for s in summary.steps] == [400, 400]
    uri = summary.step("small").uri
    assert uri.startswith(f"{root}/small/small/")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.exists(f"{uri}/_manifest.json")
    ds = difforge.open_dataset(uri)
    table = ds.to_arrow()
    assert table.num_rows == 400 and set(table.column("width").to_pylist()) == {12}
    assert ds.to_ray().count() == 400
    again = difforge.run(spec)
    assert all(s.cached for s in again.steps)
    # the manifest is the commit: a second writer of the same dataset loses, cleanly
    from difforge.platform.outputs import open_output

    late = open_output(uri)
    manifest, ours = late.commit([late.write(table.slice(0, 3), "x")], "other", {"run": "late"})
    assert not ours and manifest.num_rows == 400
    assert difforge.open_dataset(uri).num_rows == 400


def test_tracking_on_an_mlflow_server(ray_session, mlflow_server, tmp_path):
    spec = {
        **SMALL,
        "storage": str(tmp_path / "storage"),
        "tracking": {"uri": mlflow_server, "experiment": "server-test"},
    }
    summary = difforge.run(spec)
    assert summary.tracking_uri == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(summary.run_id)}
    assert "resolved.json" in names
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{summary.run_id}'"
    )
    assert {r.data.tags["difforge.step"] for r in children} == {"raw", "small"}
    small = next(r for r in children if r.data.tags["difforge.step"] == "small")
    assert small.data.metrics["rows_out"] == 400


def test_mlflow_answers_the_in_cluster_service_name(mlflow_server):
    """With the manifest's --allowed-hosts, a client that addresses the Service by name (Host:
    mlflow:5000) is answered; MLflow's default refused it with 403 while /health said 200."""
    import urllib.error
    import urllib.request

    def status(host: str) -> int:
        request = urllib.request.Request(
            f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host},
        )
        try:
            return urllib.request.urlopen(request, timeout=30).status
        except urllib.error.HTTPError as exc:
            return exc.code

    for host in (
        "mlflow:5000",
        "mlflow",
        "mlflow.difforge.svc.cluster.local:5000",
        "localhost:5000",
    ):
        assert status(host) == 200, host
    assert status("attacker.example:5000") == 403  # the DNS-rebinding guard is still on


def test_the_commit_protocol_on_s3(s3_server):
    """Create-if-absent, replace conditional on the old manifest's ETag, checksums: on S3."""
    import pyarrow as pa
    import pytest

    from difforge.platform.errors import DifforgeError
    from difforge.platform.outputs import _replace, open_output, write_dataset

    uri = f"s3://datasets/{uuid.uuid4().hex[:8]}/ds"
    first = write_dataset(uri, pa.table({"id": ["a", "b"]}), "fp")
    forced = open_output(uri)
    entries = [forced.write(pa.table({"id": ["c"]}), "0")]
    assert difforge.open_dataset(uri).num_rows == 2  # the old commit, while the new is written
    manifest, ours = forced.commit(entries, "fp", {"run": "forced"}, replace=True)
    assert ours and difforge.open_dataset(uri).to_arrow().column("id").to_pylist() == ["c"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.exists(f"{uri}/{first.files[0].path}")  # kept until gc
    # a replace that raced another one (the ETag it read is stale) loses
    path = uri.removeprefix("s3://") + "/_manifest.json"
    stale = fs.info(path)["ETag"]
    fs.pipe_file(path, fs.cat_file(path) + b"\n")  # someone else's replace
    fs.invalidate_cache()
    bucket, key, _ = fs.split_path(path)
    with pytest.raises(OSError):
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"{}", IfMatch=stale)
    assert _replace(fs, path, fs.cat_file(path))  # with a fresh look, it goes through
    data = bytearray(fs.cat_file(f"{uri}/{manifest.files[0].path}"))
    data[-12] ^= 0xFF
    fs.pipe_file(f"{uri}/{manifest.files[0].path}", bytes(data))
    with pytest.raises(DifforgeError, match="checksum differs"):
        difforge.open_dataset(uri).to_arrow()
