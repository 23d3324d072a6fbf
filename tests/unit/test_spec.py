"""Spec validation: every malformed pipeline is refused with a message naming the file, the
line, the step and the field, and nothing runs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import difforge
from difforge.platform.errors import DifforgeError, SpecError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def problems(tmp_path: Path, text: str, overrides: list[str] | None = None) -> list:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        difforge.plan(path, overrides)
    return info.value.problems


GOOD = """
name: demo
storage: {storage}
steps:
  - id: raw
    op: ingest.digits
    params: {{limit: 100}}
  - id: small
    op: image.resize
    inputs: [raw]
    params: {{size: 16}}
  - id: clf
    op: train.classifier
    inputs: [small]
    params: {{epochs: 1}}
"""


def test_valid_pipeline_resolves_in_order_with_fingerprints(tmp_path):
    plan = difforge.plan(write(tmp_path, GOOD.format(storage=tmp_path / "s")))
    assert [s.id for s in plan.steps] == ["raw", "small", "clf"]
    assert len({s.fingerprint for s in plan.steps}) == 3
    assert all(not s.cached for s in plan.steps)
    assert plan.step("small").uri == f"{tmp_path}/s/demo/small/{plan.step('small').fingerprint}"


def test_unknown_operator_suggests_a_close_match(tmp_path):
    (p,) = problems(tmp_path, GOOD.format(storage="s").replace("image.resize", "image.resise"))
    assert p.step == "small" and p.field == "op" and p.line == 8
    assert "unknown operator 'image.resise'" in p.message
    assert "Did you mean 'image.resize'?" in p.message
    assert "ingest.fashion_mnist" in p.message  # the known ones are listed


def test_typo_in_params_names_line_step_field_and_allowed(tmp_path):
    ps = problems(tmp_path, GOOD.format(storage="s").replace("{size: 16}", "{sise: 16}"))
    assert {p.field for p in ps} == {"params.sise", "params.size"}  # unknown, and missing
    p = next(p for p in ps if p.field == "params.sise")
    assert p.step == "small"
    assert p.field == "params.sise"
    assert p.line == 10
    assert "allowed: size, method, mode, fill, resample" in p.message
    assert str(p).startswith(f"{tmp_path}/pipeline.yaml:10: step 'small': params.sise:")


def test_missing_required_param(tmp_path):
    (p,) = problems(tmp_path, GOOD.format(storage="s").replace("{size: 16}", "{}"))
    assert (p.step, p.field) == ("small", "params.size")
    assert "required" in p.message


def test_wrong_type_and_out_of_range_values(tmp_path):
    text = GOOD.format(storage="s").replace("{limit: 100}", "{limit: -3}")
    text = text.replace("{epochs: 1}", "{epochs: many}")
    ps = problems(tmp_path, text)
    by_step = {p.step: p for p in ps}
    assert (
        by_step["raw"].field == "params.limit"
        and "greater than or equal to 1" in by_step["raw"].message
        and "-3" in by_step["raw"].message
    )
    assert by_step["raw"].line == 6
    assert by_step["clf"].field == "params.epochs" and "'many'" in by_step["clf"].message
    assert by_step["clf"].line == 14


def test_literal_choices_are_listed(tmp_path):
    text = GOOD.format(storage="s").replace("{size: 16}", "{size: 16, method: stretch}")
    (p,) = problems(tmp_path, text)
    assert p.field == "params.method"
    assert "'pad', 'resize' or 'center_crop'" in p.message


def test_duplicate_step_ids(tmp_path):
    text = GOOD.format(storage="s").replace("id: clf", "id: small")
    ps = problems(tmp_path, text)
    assert any(p.step == "small" and "duplicate step id" in p.message and p.line == 11 for p in ps)


def test_reference_to_unknown_step(tmp_path):
    (p,) = problems(tmp_path, GOOD.format(storage="s").replace("inputs: [small]", "inputs: [smal]"))
    assert p.step == "clf" and p.field == "inputs" and p.line == 13
    assert "'smal' is not a step of this pipeline" in p.message


def test_unknown_side_output(tmp_path):
    text = GOOD.format(storage="s").replace("inputs: [small]", "inputs: [small.reject]")
    (p,) = problems(tmp_path, text)
    assert "has no output 'reject' (side outputs: rejects)" in p.message


def test_cycle_is_named(tmp_path):
    text = """
    name: loop
    steps:
      - id: a
        op: image.resize
        inputs: [b]
        params: {size: 8}
      - id: b
        op: image.resize
        inputs: [a]
        params: {size: 8}
    """
    (p,) = problems(tmp_path, text)
    assert "cycle" in p.message and "a -> b -> a" in p.message


def test_column_mismatch_between_steps(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(images / "x.png")
    text = f"""
    name: cols
    storage: {tmp_path / "s"}
    steps:
      - id: raw
        op: ingest.images
        params: {{path: {images}}}
      - id: clf
        op: train.classifier
        inputs: [raw]
    """
    (p,) = problems(tmp_path, text)
    assert p.step == "clf" and p.field == "inputs"
    assert "needs column(s) label in its input 'raw'" in p.message


def test_wrong_number_of_inputs(tmp_path):
    text = GOOD.format(storage="s").replace("inputs: [raw]", "inputs: []")
    (p,) = problems(tmp_path, text)
    assert p.step == "small" and "takes 1 input(s), got 0" in p.message


def test_invalid_yaml_reports_its_line(tmp_path):
    (p,) = problems(tmp_path, "name: x\nsteps:\n  - id: a\n    op: [unclosed\n")
    assert p.line is not None and "not valid YAML" in p.message


def test_unknown_top_level_and_step_fields(tmp_path):
    text = GOOD.format(storage="s").replace("name: demo", "name: demo\nstorgae: x")
    text = text.replace("    op: train.classifier", "    op: train.classifier\n    param: {}")
    ps = problems(tmp_path, text)
    top = next(p for p in ps if p.field == "storgae")
    assert top.line == 2 and "allowed: name, storage, tracking, steps" in top.message
    step = next(p for p in ps if p.field == "param")
    assert step.step == "clf" and "allowed: id, op, inputs, params, resources" in step.message


def test_bad_resources(tmp_path):
    text = GOOD.format(storage="s").replace(
        "params: {epochs: 1}", "params: {epochs: 1}\n    resources: {num_gpu: 1}"
    )
    (p,) = problems(tmp_path, text)
    assert p.step == "clf" and p.field == "resources.num_gpu"
    assert "num_gpus" in p.message  # the allowed names are listed


def test_every_problem_is_reported_at_once(tmp_path):
    text = GOOD.format(storage="s").replace("{limit: 100}", "{limt: 1}")
    text = text.replace("{epochs: 1}", "{epoch: 1}")
    ps = problems(tmp_path, text)
    assert {p.step for p in ps} == {"raw", "clf"}


def test_yaml_cannot_execute_code(tmp_path):
    text = "name: x\nsteps: !!python/object/apply:os.system ['echo pwned']\n"
    (p,) = problems(tmp_path, text)
    assert "not valid YAML" in p.message


def test_set_overrides_nested_params_and_are_named_in_errors(tmp_path):
    path = write(tmp_path, GOOD.format(storage=tmp_path / "s"))
    plan = difforge.plan(path, ["small.params.size=[16, 12]", "clf.params.lr=0.01"])
    assert plan.step("small").params.size == (16, 12)
    assert plan.step("clf").params.lr == 0.01
    base = difforge.plan(path)
    assert plan.step("raw").fingerprint == base.step("raw").fingerprint
    assert plan.step("small").fingerprint != base.step("small").fingerprint
    with pytest.raises(SpecError) as info:
        difforge.plan(path, ["clf.params.epochs=zero"])
    (p,) = info.value.problems
    assert p.file == "--set clf.params.epochs=zero" and p.field == "params.epochs"
    with pytest.raises(SpecError, match="'nope' is not a step id"):
        difforge.plan(path, ["nope.params.x=1"])


def test_until_and_force_select_steps(tmp_path):
    path = write(tmp_path, GOOD.format(storage=tmp_path / "s"))
    assert [s.id for s in difforge.plan(path, until="small").steps] == ["raw", "small"]
    plan = difforge.plan(path, force=["small"])
    assert [s.forced for s in plan.steps] == [False, True, True]
    with pytest.raises(SpecError, match="--until: no step 'x'"):
        difforge.plan(path, until="x")


def test_resources_do_not_change_fingerprints(tmp_path):
    path = write(tmp_path, GOOD.format(storage=tmp_path / "s"))
    base = difforge.plan(path)
    more = difforge.plan(path, ["clf.resources.num_workers=2", "small.resources.batch_size=7"])
    assert [s.fingerprint for s in base.steps] == [s.fingerprint for s in more.steps]


def test_operator_version_is_part_of_the_fingerprint(tmp_path, monkeypatch):
    from difforge.operators.image.resize import Resize

    path = write(tmp_path, GOOD.format(storage=tmp_path / "s"))
    base = difforge.plan(path)
    monkeypatch.setattr(Resize, "version", Resize.version + 1)
    bumped = difforge.plan(path)
    assert base.step("raw").fingerprint == bumped.step("raw").fingerprint
    assert base.step("small").fingerprint != bumped.step("small").fingerprint
    assert base.step("clf").fingerprint != bumped.step("clf").fingerprint


def test_changed_source_files_change_the_fingerprint(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs" / "cat"
    images.mkdir(parents=True)
    Image.new("L", (8, 8)).save(images / "a.png")
    text = f"""
    name: src
    storage: {tmp_path / "s"}
    steps:
      - id: raw
        op: ingest.images
        params: {{path: {tmp_path / "imgs"}, labels: folders}}
    """
    path = write(tmp_path, text)
    first = difforge.plan(path).step("raw").fingerprint
    assert difforge.plan(path).step("raw").fingerprint == first
    Image.new("L", (9, 9)).save(images / "b.png")
    assert difforge.plan(path).step("raw").fingerprint != first


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    text = f"""
    name: fm
    storage: {tmp_path / "s"}
    steps:
      - id: raw
        op: ingest.fashion_mnist
        params: {{root: {tmp_path / "nowhere"}}}
    """
    (p,) = problems(tmp_path, text)
    assert p.step == "raw" and "apt-get install dataset-fashion-mnist" in p.message


def test_every_shipped_pipeline_validates(tmp_path):
    from PIL import Image

    from tests.tiny_models import tiny_captioner, tiny_clip

    Image.new("RGB", (40, 40)).save(tmp_path / "one.png")
    needs = {  # their data and (offline) their models are the user's
        "curate-images.yaml": [f"raw.params.path={tmp_path}"],
        "curate-embeddings.yaml": [
            f"raw.params.path={tmp_path}",
            f"embedded.params.model={tiny_clip(tmp_path / 'clip')}",
            f"captioned.params.model={tiny_captioner(tmp_path / 'cap')}",
        ],
    }
    root = Path(__file__).resolve().parents[2] / "pipelines"
    files = sorted(root.rglob("*.yaml"))
    assert files
    from difforge.platform.plan import build_plan
    from difforge.platform.sweep import load_sweep

    for f in files:
        assert f.read_text().startswith("#"), f"{f}: the header comment shows how to run it"
        sweep = load_sweep(str(f), needs.get(f.name, []))
        if sweep is None:
            difforge.plan(str(f), needs.get(f.name, []))
        else:  # an experiment: every variant plans
            for v in sweep.variants:
                build_plan(sweep.variant_spec(v), check_cache=False)


def test_auto_precision_puts_the_device_class_in_the_fingerprint(tmp_path, monkeypatch):
    """`dtype: auto` is bf16 on GPUs and fp32 on CPUs: the same spec planned for a CUDA
    machine and for a CPU one describes two different computations."""
    steps = [
        {"id": "raw", "op": "ingest.digits"},
        {
            "id": "lat",
            "op": "encode.vae",
            "inputs": ["raw"],
            "params": {"pretrained": str(tmp_path), "dtype": "auto"},
        },
        {
            "id": "lat32",
            "op": "encode.vae",
            "inputs": ["raw"],
            "params": {"pretrained": str(tmp_path), "dtype": "float32"},
        },
    ]
    spec = {"name": "dev", "storage": str(tmp_path / "s"), "steps": steps}
    monkeypatch.setenv("DIFFORGE_DEVICE_CLASS", "cpu")
    cpu = difforge.plan(spec)
    monkeypatch.setenv("DIFFORGE_DEVICE_CLASS", "cuda")
    cuda = difforge.plan(spec)
    assert cpu.step("lat").fingerprint != cuda.step("lat").fingerprint
    assert (cpu.step("lat").device, cuda.step("lat").device) == ("cpu", "cuda")
    assert cpu.step("lat32").fingerprint == cuda.step("lat32").fingerprint  # explicit: same
    assert cpu.step("raw").fingerprint == cuda.step("raw").fingerprint
    monkeypatch.setenv("DIFFORGE_DEVICE_CLASS", "tpu")
    with pytest.raises(DifforgeError, match="DIFFORGE_DEVICE_CLASS='tpu'"):
        difforge.plan(spec)
