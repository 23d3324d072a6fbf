"""A pass-through operator for measuring the fixed cost of a step."""

from __future__ import annotations

import sys

from difforge.platform.operator import MapOperator


class Noop(MapOperator):
    """Passes its batch through unchanged."""

    name = "bench.noop"

    def process(self, batch):
        return batch


def register_noop() -> None:
    from ray import cloudpickle

    from difforge.platform import registry

    # Workers need not import `benchmarks`: ship this module's code by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registry.register(Noop)
