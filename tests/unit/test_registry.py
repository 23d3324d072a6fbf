"""Operator registration: explicit, duplicates refused, plugins through entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel, ConfigDict

from difforge.platform import registry
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import MapOperator
from tests.conftest import make_plugin


def test_duplicate_name_is_an_error():
    class Clash(MapOperator):
        name = "image.resize"

    with pytest.raises(DifforgeError, match="'image.resize' is already registered"):
        registry.register(Clash)


def test_params_must_forbid_extra_fields():
    class Loose(BaseModel):
        x: int = 1

    class Sloppy(MapOperator):
        name = "test.sloppy"
        Params = Loose

    with pytest.raises(DifforgeError, match="extra='forbid'"):
        registry.register(Sloppy)


def test_register_and_use_a_test_operator(tmp_path):
    import difforge

    class P(BaseModel):
        model_config = ConfigDict(extra="forbid")
        factor: int = 2

    class Double(MapOperator):
        """Doubles x."""

        name = "test.double"
        Params = P
        reads = ("x",)

    registry.register(Double)
    try:
        spec = {
            "name": "t",
            "storage": str(tmp_path),
            "steps": [
                {"id": "a", "op": "ingest.digits"},
                {"id": "b", "op": "test.double", "inputs": ["a"], "params": {"factr": 3}},
            ],
        }
        with pytest.raises(DifforgeError, match="unknown parameter of 'test.double'"):
            difforge.plan(spec)
        spec["steps"][1]["params"] = {}
        with pytest.raises(DifforgeError, match="needs column"):
            difforge.plan(spec)
    finally:
        registry.unregister("test.double")


def test_entry_point_plugins_join_the_registry(tmp_path):
    env = make_plugin(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "difforge.cli", "ops", "plugin.hello"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "plugin.hello" in out.stdout and "A plugin operator." in out.stdout
    assert "seconds: float (default 0.1)" in out.stdout


def test_plugin_clashing_with_a_builtin_is_refused(tmp_path):
    env = make_plugin(tmp_path, name="image.resize = difforge_plugin:Hello")
    (tmp_path / "difforge_plugin.py").write_text(
        (tmp_path / "difforge_plugin.py").read_text().replace("plugin.hello", "image.resize")
    )
    out = subprocess.run(
        [sys.executable, "-m", "difforge.cli", "ops"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert "operator name 'image.resize' is declared twice: by difforge entry point" in out.stderr
    assert "and by difforge-plugin entry point 'image.resize = difforge_plugin:Hello'" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr


def test_an_entry_point_must_be_named_as_its_operator(tmp_path):
    env = make_plugin(tmp_path, name="plugin.hi = difforge_plugin:Hello")
    out = subprocess.run(
        [sys.executable, "-m", "difforge.cli", "ops", "plugin.hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "loads operator 'plugin.hello', not 'plugin.hi'" in out.stderr
