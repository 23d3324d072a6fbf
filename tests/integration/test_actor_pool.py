"""Operators that hold a model run as an actor pool: set up once per actor, and a pool as
large as the node (two 1-CPU actors on two CPUs) neither deadlocks nor waits forever."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
from pydantic import BaseModel, ConfigDict
from ray import cloudpickle

import difforge
from difforge.platform import registry
from difforge.platform.operator import MapOperator

SETUPS: list[int] = []


class P(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stamp(MapOperator):
    """Stamps each row with the process that handled it and how often it was set up."""

    name = "test.stamp"
    Params = P
    stateful = True
    reads = ("id",)
    writes = ("pid", "setups")

    def setup(self, ctx) -> None:
        SETUPS.append(os.getpid())  # a "model load"
        self.setups = len(SETUPS)

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        batch = batch.append_column("pid", pa.array([os.getpid()] * n, pa.int64()))
        return batch.append_column("setups", pa.array([self.setups] * n, pa.int64()))


def test_actor_pool_of_two_on_two_cpus(ray_session, tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registry.register(Stamp)
    try:
        spec = {
            "name": "pool",
            "storage": str(tmp_path),
            "steps": [
                {"id": "raw", "op": "ingest.digits", "resources": {"batch_size": 100}},
                {
                    "id": "stamp",
                    "op": "test.stamp",
                    "inputs": ["raw"],
                    "resources": {
                        "min_actors": 2,
                        "max_actors": 2,
                        "num_cpus": 1,
                        "batch_size": 50,
                    },
                },
            ],
        }
        summary = difforge.run(spec)
    finally:
        registry.unregister("test.stamp")
    table = difforge.open_dataset(summary.step("stamp").uri).to_arrow()
    assert table.num_rows == 1797 and len(set(table.column("id").to_pylist())) == 1797
    pids = set(table.column("pid").to_pylist())
    assert len(pids) == 2  # both actors worked
    assert set(table.column("setups").to_pylist()) == {1}  # each set up exactly once
