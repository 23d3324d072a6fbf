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


def test_a_run_whose_driver_went_silent_is_known_gone_on_any_host():
    """A run's liveness is its driver's heartbeat, not its host name: silent for longer than
    STALE_S anywhere means gone; a fresh heartbeat from another host means alive."""
    import socket
    import time

    from difforge.platform import watchdog

    now = time.time()
    elsewhere = {watchdog.HOST: "another-host", watchdog.PID: "1", watchdog.PID_START: "0"}
    fresh = {**elsewhere, watchdog.HEARTBEAT: f"{now - 5:.0f}"}
    assert watchdog.driver_gone(fresh, now) is None
    silent = {**elsewhere, watchdog.HEARTBEAT: f"{now - watchdog.STALE_S - 60:.0f}"}
    assert "heartbeat stopped" in watchdog.driver_gone(silent, now)
    assert watchdog.driver_gone(elsewhere, now) is None  # an older driver: no heartbeat, unknown
    here_dead = {
        watchdog.HOST: socket.gethostname(),
        watchdog.PID: "999999999",
        watchdog.PID_START: "0",
        watchdog.HEARTBEAT: f"{now:.0f}",
    }
    assert "dead" in watchdog.driver_gone(here_dead, now)
