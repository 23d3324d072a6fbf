"""Sampling a trained model (the digits pipelines' shared teacher) and evaluating the samples:
determinism whatever the batch or pool, resume after a crash, and metrics that order images as
they should."""

from __future__ import annotations

import io

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image, ImageFilter

import difforge
from difforge.models.metrics import frechet_distance, precision_recall
from difforge.platform.errors import DifforgeError
from tests.conftest import digits_pipeline


def pipeline(storage) -> dict:
    """The digits pipeline (its teacher and classifier shared with other modules), sampled."""
    return digits_pipeline(
        storage,
        "sampling-tests",
        [
            {
                "id": "plan",
                "op": "sample.plan",
                "inputs": ["teacher"],
                "params": {"num_images": 60, "rows_per_shard": 16},
            },
            {
                "id": "samples",
                "op": "sample.diffusion",
                "inputs": ["plan"],
                "params": {"num_inference_steps": 5},
                "resources": {"batch_size": 16},
            },
            {
                "id": "quality",
                "op": "evaluate.fid",
                "inputs": ["samples", "test", "clf"],
                "params": {"kid_subset_size": 50},
            },
        ],
    )


@pytest.fixture(scope="module")
def sampled(ray_session, digits_storage):
    return digits_storage, difforge.run(pipeline(digits_storage))


def images_of(uri: str) -> dict[int, np.ndarray]:
    rows = difforge.open_dataset(uri).to_arrow(columns=["index", "image"]).to_pylist()
    return {r["index"]: np.asarray(Image.open(io.BytesIO(r["image"])), np.float32) for r in rows}


def test_each_index_once_and_metrics_logged(sampled):
    _, summary = sampled
    samples = difforge.open_dataset(summary.step("samples").uri).to_arrow()
    assert sorted(samples.column("index").to_pylist()) == list(range(60))
    assert set(samples.column("label").to_pylist()) == set(range(10))
    q = difforge.open_dataset(summary.step("quality").uri).to_arrow().to_pylist()[0]
    assert q["fid"] > 0 and 0 <= q["precision"] <= 1 and 0 <= q["recall"] <= 1
    assert 0 <= q["class_accuracy"] <= 1 and q["num_samples"] == 60
    # a sampler's rows are samples: its rate is logged (and reported) as samples/s
    m = MlflowClient(summary.tracking_uri).get_run(summary.step("samples").run_id).data.metrics
    assert m["samples_per_s"] == m["rows_per_s"] > 0


def test_same_seed_same_image_whatever_the_batch_or_pool(sampled):
    tmp, summary = sampled
    first = images_of(summary.step("samples").uri)
    again = difforge.run(
        pipeline(tmp), ["samples.resources.max_actors=2"], until="samples", force=["samples"]
    )
    second = images_of(again.step("samples").uri)
    assert all(np.array_equal(first[i], second[i]) for i in first)  # bit-identical
    other = difforge.run(
        pipeline(tmp), ["samples.resources.batch_size=5"], until="samples", force=["samples"]
    )
    third = images_of(other.step("samples").uri)
    # other batch sizes may change the last bits of batched kernels, never the image
    assert max(np.abs(first[i] - third[i]).max() for i in first) <= 2.0


def test_resume_samples_only_what_is_missing(sampled):
    tmp, summary = sampled
    uri = summary.step("samples").uri
    from pathlib import Path

    root = Path(uri)
    first = {f.path for f in difforge.open_dataset(uri).manifest.files}
    (root / "_manifest.json").unlink()  # as if the run had died before committing
    done = sorted(root.glob("_work/*/passes/pass-*/item-*.done.json"))
    assert len(done) == 4  # 60 rows in shards of 16
    for marker in done[2:]:  # ... and after only two of the four shards were finished
        marker.unlink()
    again = difforge.run(pipeline(tmp), until="samples")
    assert again.step("samples").cached is False
    files = {f.path for f in difforge.open_dataset(uri).manifest.files}

    def items(paths):
        return {p.rsplit("/", 1)[-1].split("-")[1] for p in paths}

    assert items(files & first) == {"000000", "000001"}  # kept, from the first attempt
    assert items(files - first) == {"000002", "000003"}  # sampled again, in a new attempt
    rows = difforge.open_dataset(uri).to_arrow(columns=["index"]).column("index").to_pylist()
    assert sorted(rows) == list(range(60))


def test_metrics_order_real_noisy_blurred():
    rng = np.random.default_rng(0)
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    a, b = x[::2], x[1::2]
    noisy = b + rng.normal(0, 4, b.shape)
    noisier = b + rng.normal(0, 8, b.shape)
    blurred = np.stack(
        [
            np.asarray(
                Image.fromarray((im.reshape(8, 8) * 15).astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(1.5)
                ),
                np.float64,
            ).flatten()
            / 15
            for im in b
        ]
    )
    same = frechet_distance(a, b)
    assert same < frechet_distance(a, noisy) < frechet_distance(a, noisier)
    assert same < frechet_distance(a, blurred)
    p_same, r_same = precision_recall(a[:400], b[:400], 3)
    p_noise, _ = precision_recall(a[:400], noisier[:400], 3)
    assert p_same > 0.8 and r_same > 0.8 and p_noise < p_same


def test_difforge_sample_command(sampled, tmp_path):
    from tests.conftest import difforge_cli

    _, summary = sampled
    model = difforge.open_dataset(summary.step("teacher").uri).to_arrow().to_pylist()[0]
    out = difforge_cli(
        "sample",
        model["model_uri"],
        "--n",
        "6",
        "--class",
        "3",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "s"),
    )
    assert out.returncode == 0, out.stderr
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == [
        "00000-class3.png",
        "00001-class3.png",
        "00002-class3.png",
        "00003-class3.png",
        "00004-class3.png",
        "00005-class3.png",
        "grid.png",
    ]
    bad = difforge_cli("sample", model["model_uri"], "--class", "12")
    assert bad.returncode == 2 and "the model has 10 classes" in bad.stderr


def test_model_samples_score_between_real_data_and_noise(sampled):
    from difforge.models.classifier import classifier_features, load_classifier, load_images

    _, summary = sampled
    clf = difforge.open_dataset(summary.step("clf").uri).to_arrow().to_pylist()[0]
    net, _ = load_classifier(clf["model_uri"])

    def feats(step):
        return classifier_features(
            net,
            load_images(
                difforge.open_dataset(summary.step(step).uri).file_uris(), "L", with_labels=False
            )[0],
        )[0]

    train, test, samples = feats("raw")[:600], feats("test"), feats("samples")
    noise = np.random.default_rng(0).integers(0, 256, (200, 1, 8, 8), dtype=np.uint8)
    garbage = classifier_features(net, noise)[0]
    real = frechet_distance(train, test)
    model = frechet_distance(test, samples)
    assert real < model < frechet_distance(test, garbage)


def committed(uri: str, table) -> str:
    from difforge.platform.outputs import write_dataset

    write_dataset(uri, table, "test", {"step": "test"})
    return uri


def test_memorization_finds_the_copies(sampled, tmp_path):
    import pyarrow as pa

    _, summary = sampled
    train = difforge.open_dataset(summary.step("raw").uri).to_arrow(columns=["id", "image"])
    test = difforge.open_dataset(summary.step("test").uri).to_arrow(columns=["id", "image"])
    copied = train.slice(100, 20)
    fake = pa.table(
        {
            "id": [f"copy-{i}" for i in range(20)] + [f"fresh-{i}" for i in range(80)],
            "image": copied.column("image").to_pylist() + test.column("image").to_pylist()[:80],
        }
    )
    fake_uri = committed(str(tmp_path / "fake"), fake)
    spec = {
        "name": "mem",
        "storage": str(tmp_path / "s"),
        "tracking": {"experiment": "mem-tests"},
        "steps": [
            {
                "id": "mem",
                "op": "evaluate.memorization",
                "inputs": [fake_uri, summary.step("raw").uri],
            }
        ],
    }
    out = difforge.run(spec)
    rows = {r["id"]: r for r in difforge.open_dataset(out.step("mem").uri).to_arrow().to_pylist()}
    sources = copied.column("id").to_pylist()
    for i in range(20):
        r = rows[f"copy-{i}"]
        assert r["memorized"] and r["distance"] < 1e-2 and r["nearest_id"] == sources[i]
    fresh = [rows[f"fresh-{i}"]["memorized"] for i in range(80)]
    assert sum(fresh) <= 4  # held-out digits are not copies of training digits
    run = MlflowClient(out.tracking_uri).get_run(out.step("mem").run_id)
    assert 0.2 <= run.data.metrics["memorized_fraction"] <= 0.24
    assert "closest_pairs.png" in {
        a.path for a in MlflowClient(out.tracking_uri).list_artifacts(run.info.run_id)
    }


def test_inception_features_and_cached_reference(sampled):
    tmp, summary = sampled
    spec = pipeline(tmp)
    spec["steps"].append(
        {
            "id": "inception",
            "op": "evaluate.fid",
            "inputs": ["samples", "test"],
            "params": {
                "features": "inception",
                "max_images": 16,
                "kid_subset_size": 10,
                "kid_subsets": 2,
            },
        }
    )
    first = difforge.run(spec, until="inception")
    q = difforge.open_dataset(first.step("inception").uri).to_arrow().to_pylist()[0]
    assert q["features"] == "inception" and q["fid"] > 0 and q["reference_cached"] == 0.0
    again = difforge.run(spec, ["inception.params.kid_subsets=3"], until="inception")
    q2 = difforge.open_dataset(again.step("inception").uri).to_arrow().to_pylist()[0]
    assert q2["reference_cached"] == 1.0  # the reference side was not computed again
    assert abs(q2["fid"] - q["fid"]) < 1e-6 * max(1.0, q["fid"])


def test_feature_step_matches_what_evaluation_computed(sampled):
    """`encode.features` is the extractor `evaluate.fid` uses: its predicted labels give the
    class accuracy the evaluation logged, and the Fréchet distance of its features (computed
    here from the whole arrays) is the one the evaluation streamed."""
    from difforge.platform.tensors import to_numpy

    tmp, summary = sampled
    spec = pipeline(tmp)
    spec["steps"] += [
        {"id": "feats", "op": "encode.features", "inputs": ["samples", "clf"]},
        {"id": "test_feats", "op": "encode.features", "inputs": ["test", "clf"]},
    ]
    out = difforge.run(spec)
    feats = difforge.open_dataset(out.step("feats").uri)
    assert {"id", "label", "features", "predicted_label"} <= set(feats.manifest.column_names)
    assert "image" not in feats.manifest.column_names
    t = feats.to_arrow()
    f_fake = to_numpy(t.column("features"))
    assert f_fake.shape == (60, 128) and f_fake.dtype == np.float32
    q = difforge.open_dataset(summary.step("quality").uri).to_arrow().to_pylist()[0]
    accuracy = np.mean(t.column("label").to_numpy() == t.column("predicted_label").to_numpy())
    assert abs(accuracy - q["class_accuracy"]) < 1e-9
    f_real = to_numpy(
        difforge.open_dataset(out.step("test_feats").uri).to_arrow().column("features")
    ).astype(np.float64)
    assert abs(frechet_distance(f_real, f_fake.astype(np.float64)) - q["fid"]) < 1e-6 * q["fid"]


def test_the_teacher_as_a_zero_shot_classifier(sampled):
    """Li et al.'s diffusion classifier on 200 held-out digits with the shared teacher: well above
    chance (10%), with the adaptive schedule spending 10 trials on every class and 20 more on
    the 3 likeliest (160 evaluations per image instead of 300)."""
    import pyarrow.compute as pc

    storage, _ = sampled
    spec = pipeline(storage)
    spec["steps"] += [
        {"id": "held_out", "op": "ingest.digits", "params": {"split": "test", "limit": 200}},
        {
            "id": "zero_shot",
            "op": "evaluate.diffusion_classifier",
            "inputs": ["held_out", "teacher"],
            "resources": {"batch_size": 100},
        },
    ]
    out = difforge.run(spec, until="zero_shot")
    table = difforge.open_dataset(out.step("zero_shot").uri).to_arrow()
    assert table.num_rows == 200 and "image" not in table.column_names
    accuracy = pc.mean(pc.equal(table.column("label"), table.column("predicted_label"))).as_py()
    assert accuracy >= 0.3, accuracy
    assert set(table.column("evaluations").to_pylist()) == {160}
    errors = np.stack(table.column("class_errors").to_numpy(zero_copy_only=False))
    assert errors.shape == (200, 10)
    assert (errors.argmin(1) == table.column("predicted_label").to_numpy()).mean() > 0.9
    run = MlflowClient(out.tracking_uri).get_run(out.step("zero_shot").run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(accuracy)
    assert run.data.metrics["evaluations_per_image"] == 160
    names = {a.path for a in MlflowClient(out.tracking_uri).list_artifacts(run.info.run_id)}
    assert "confusion.png" in names


def test_diffusion_features_carry_the_class_and_a_probe_reads_them(sampled):
    """The shared teacher's mid-block features of the training digits (noised to t = 0.1,
    unconditionally): a linear probe reads the class far better than the same probe on
    shuffled labels (the control), and its learning curve is logged point by point."""
    storage, _ = sampled
    spec = pipeline(storage)
    spec["steps"] += [
        {
            "id": "dfeats",
            "op": "encode.diffusion_features",
            "inputs": ["raw", "teacher"],
            "params": {"block": "mid_block", "t": 0.1},
        },
        {
            "id": "probe",
            "op": "evaluate.linear_probe",
            "inputs": ["dfeats"],
            "params": {"fractions": [0.25, 1.0]},
        },
        {
            "id": "control",
            "op": "evaluate.linear_probe",
            "inputs": ["dfeats"],
            "params": {"fractions": [1.0], "shuffle_labels": True},
        },
    ]
    out = difforge.run(spec)
    feats = difforge.open_dataset(out.step("dfeats").uri)
    assert feats.metadata["features"]["kind"] == "diffusion"
    assert feats.metadata["features"]["block"] == "mid_block"
    table = feats.to_arrow()
    assert "image" not in table.column_names and table.num_rows == out.step("raw").rows_out
    curve = difforge.open_dataset(out.step("probe").uri).to_arrow().to_pylist()
    control = difforge.open_dataset(out.step("control").uri).to_arrow().to_pylist()
    assert [r["train_rows"] for r in curve][-1] == control[-1]["train_rows"]
    assert curve[-1]["eval_accuracy"] > control[-1]["eval_accuracy"] + 0.3, (curve, control)
    client = MlflowClient(out.tracking_uri)
    run = out.step("probe").run_id
    history = client.get_metric_history(run, "eval_accuracy")
    assert [m.step for m in history] == [r["train_rows"] for r in curve]
    assert "learning_curve.png" in {a.path for a in client.list_artifacts(run)}
    with pytest.raises(DifforgeError, match="no block 'nope'"):
        bad = pipeline(storage)
        bad["steps"].append(
            {
                "id": "bad",
                "op": "encode.diffusion_features",
                "inputs": ["raw", "teacher"],
                "params": {"block": "nope"},
            }
        )
        difforge.run(bad, until="bad")
