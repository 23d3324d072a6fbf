"""The cause a failed step reports: the user's own error, even where it was raised while
another was being handled (the stopped run's error behind the check that stopped it)."""

from __future__ import annotations

from difforge.platform.failures import cause


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the error is what the test looks at
        return exc
    raise AssertionError("nothing raised")


def test_the_innermost_cause_is_named():
    def inner():
        try:
            raise KeyError("the shard")
        except KeyError as exc:
            raise RuntimeError("while reading") from exc

    assert cause(raised(inner)).startswith("KeyError")


def test_an_error_raised_from_none_is_named_not_the_one_it_replaced():
    def replaced():
        try:
            raise ConnectionError("the stopped workers' actor died")
        except ConnectionError:
            raise ValueError("Must provide the same number of block_out_channels") from None

    said = cause(raised(replaced))
    assert said == "ValueError: Must provide the same number of block_out_channels"
