"""The scheduler's guarantees, with injected time: at most once per slot (restarts, two
schedulers), catch-up policies, overlap, on-failure hooks, time zones, validation."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from difforge.jobs.schedules import Schedule, Scheduler, Store
from difforge.platform.errors import DifforgeError

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc).timestamp()  # a Monday, 12:00 UTC
MINUTE = 60.0


class Runs:
    """A launcher whose runs finish when the test says so (the scheduler's side of the
    protocol is under test here; real launches are in tests/integration/test_scheduler.py)."""

    def __init__(self):
        self.started: list[tuple[str, float]] = []
        self.outcome: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()

    def start(self, schedule: Schedule, slot: float) -> str:
        with self.lock:
            self.started.append((schedule.name, slot))
            return f"job-{len(self.started)}"

    def state(self, schedule: Schedule, job_id: str) -> tuple[str, str]:
        return self.outcome.get(job_id, ("running", ""))


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'schedules.db'}")


def every_minute(store: Store, **kw) -> Schedule:
    s = Schedule(name="nightly", file="/p.yaml", cron="* * * * *", created=T0, **kw)
    store.add(s)
    return s


def statuses(store: Store, name: str = "nightly") -> list[str]:
    return [f.status for f in store.firings(name)]


def test_a_slot_fires_once_even_across_restarts(store):
    every_minute(store)
    runs = Runs()
    assert Scheduler(store, runs).tick(T0 + 30) == []  # nothing due before the first slot
    assert Scheduler(store, runs).tick(T0 + MINUTE + 0.5) == [("nightly", T0 + MINUTE, "running")]
    # the same pass again, and a "restarted" scheduler on the same store: nothing new
    assert Scheduler(store, runs).tick(T0 + MINUTE + 0.7) == []
    assert Scheduler(Store(store.url), runs).tick(T0 + MINUTE + 5) == []
    assert runs.started == [("nightly", T0 + MINUTE)]


def test_two_schedulers_on_one_store_fire_a_slot_once(store):
    every_minute(store)
    runs = Runs()
    schedulers = [Scheduler(Store(store.url), runs) for _ in range(4)]
    barrier = threading.Barrier(len(schedulers))

    def tick(s: Scheduler) -> None:
        barrier.wait()
        s.tick(T0 + MINUTE + 1)

    threads = [threading.Thread(target=tick, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs.started == [("nightly", T0 + MINUTE)]
    assert statuses(store) == ["running"]


@pytest.mark.parametrize(
    ("catchup", "started", "missed"),
    [("none", [], 5), ("latest", [5], 4), ("all", [1, 2, 3, 4, 5], 0)],
)
def test_slots_missed_while_down_follow_the_catchup_policy(store, catchup, started, missed):
    every_minute(store, catchup=catchup, overlap="allow")
    runs = Runs()
    # back 5 min 30 s after creation with a 10 s grace: all 5 slots are late
    Scheduler(store, runs, grace_s=10).tick(T0 + 5 * MINUTE + 30)
    assert [slot for _, slot in runs.started] == [T0 + k * MINUTE for k in started]
    assert statuses(store).count("missed") == missed
    assert len(store.firings("nightly")) == 5  # every slot is accounted for


def test_an_on_time_slot_fires_under_catchup_none(store):
    every_minute(store, catchup="none")
    runs = Runs()
    Scheduler(store, runs).tick(T0 + MINUTE + 2)
    assert runs.started == [("nightly", T0 + MINUTE)]


def test_overlap_skip_waits_for_the_running_one(store):
    every_minute(store, overlap="skip")
    runs = Runs()
    sched = Scheduler(store, runs)
    sched.tick(T0 + MINUTE)
    sched.tick(T0 + 2 * MINUTE)  # job-1 still running: this slot is skipped
    assert statuses(store) == ["running", "skipped"]
    runs.outcome["job-1"] = ("succeeded", "")
    sched.tick(T0 + 3 * MINUTE)
    assert statuses(store) == ["succeeded", "skipped", "running"]
    assert len(runs.started) == 2


def test_overlap_allow_starts_alongside(store):
    every_minute(store, overlap="allow")
    runs = Runs()
    sched = Scheduler(store, runs)
    sched.tick(T0 + MINUTE)
    sched.tick(T0 + 2 * MINUTE)
    assert statuses(store) == ["running", "running"]


def test_a_failed_run_is_recorded_and_alerts_once(store, tmp_path):
    alerts = tmp_path / "alerts"
    every_minute(
        store,
        on_failure=f'echo "$DIFFORGE_SCHEDULE $DIFFORGE_JOB_ID $DIFFORGE_MESSAGE" >> {alerts}',
    )
    runs = Runs()
    first, second = Scheduler(store, runs), Scheduler(Store(store.url), runs)
    first.tick(T0 + MINUTE)
    runs.outcome["job-1"] = ("failed", "step 'raw' failed: boom")
    first.settle(T0 + MINUTE + 30)
    second.settle(T0 + MINUTE + 31)  # the other scheduler sees it already settled
    first.drain()
    second.drain()
    assert statuses(store) == ["failed"]
    assert store.firings("nightly")[0].message == "step 'raw' failed: boom"
    assert alerts.read_text().splitlines() == ["nightly job-1 step 'raw' failed: boom"]


def test_a_run_that_cannot_start_is_a_failed_firing(store, tmp_path):
    alerts = tmp_path / "alerts"
    every_minute(store, on_failure=f"echo $DIFFORGE_STATUS >> {alerts}")

    class Refusing(Runs):
        def start(self, schedule, slot):
            raise DifforgeError("cannot reach the Ray cluster at http://nowhere:8265")

    sched = Scheduler(store, Refusing())
    assert sched.tick(T0 + MINUTE) == [("nightly", T0 + MINUTE, "failed")]
    assert "cannot reach" in store.firings("nightly")[0].message
    sched.drain()
    assert alerts.read_text() == "failed\n"


def test_a_slow_on_failure_command_does_not_hold_up_firing(store, tmp_path):
    done = tmp_path / "alerted"
    every_minute(store, on_failure=f"sleep 2; echo $DIFFORGE_STATUS > {done}")
    store.add(Schedule(name="other", file="/q.yaml", cron="* * * * *", created=T0))

    class RefusesNightly(Runs):
        def start(self, schedule, slot):
            if schedule.name == "nightly":
                raise DifforgeError("cannot reach the Ray cluster")
            return super().start(schedule, slot)

    runs = RefusesNightly()
    sched = Scheduler(store, runs)
    fired = sched.tick(T0 + MINUTE)
    # the tick returned with the other schedule's run started while the alert still sleeps
    assert ("other", T0 + MINUTE, "running") in fired and not done.exists()
    sched.drain()
    assert done.read_text() == "failed\n"


def test_paused_schedules_do_not_fire(store):
    every_minute(store, catchup="none")
    runs = Runs()
    store.set_paused("nightly", True)
    Scheduler(store, runs).tick(T0 + MINUTE)
    assert runs.started == []
    store.set_paused("nightly", False)
    Scheduler(store, runs).tick(T0 + 2 * MINUTE)
    assert [slot for _, slot in runs.started] == [T0 + 2 * MINUTE]


def test_cron_in_a_time_zone(store):
    s = Schedule(name="paris", file="/p.yaml", cron="0 3 * * *", timezone="Europe/Paris")
    winter = datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp()
    summer = datetime(2026, 7, 5, tzinfo=timezone.utc).timestamp()
    assert datetime.fromtimestamp(s.next_slot(winter), timezone.utc).hour == 2  # UTC+1
    assert datetime.fromtimestamp(s.next_slot(summer), timezone.utc).hour == 1  # UTC+2


def test_bad_schedules_are_refused_with_the_reason(store):
    with pytest.raises(DifforgeError, match="not a cron expression"):
        store.add(Schedule(name="x", file="/p.yaml", cron="every night"))
    with pytest.raises(DifforgeError, match="unknown time zone"):
        store.add(Schedule(name="x", file="/p.yaml", cron="0 3 * * *", timezone="Mars/Olympus"))
    every_minute(store)
    with pytest.raises(DifforgeError, match="exists"):
        every_minute(store)
    with pytest.raises(DifforgeError, match="no schedule named 'nope'"):
        store.remove("nope")
