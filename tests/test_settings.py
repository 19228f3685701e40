"""Unit tests of the settings merge, with a stand-in for Airflow's config object."""

from __future__ import annotations

import pytest

from safe_scheduler import components
from safe_scheduler.startup import settings
from safe_scheduler.base.errors import UsageError
from safe_scheduler.startup.settings import Settings


def load(overrides: dict, conf, component: str = "scheduler") -> Settings:
    """``settings.load`` for the component called ``component`` (its threshold and default port)."""
    return settings.load(overrides, conf, components.get(component))


class FakeConf:
    def __init__(self, health_threshold: str | None = None, **values: str) -> None:
        self.values = values
        self.health_threshold = health_threshold

    def get(self, section: str, key: str, fallback=None):
        if key.endswith("health_check_threshold"):  # the component's own, e.g. [scheduler] …
            return self.health_threshold if self.health_threshold is not None else fallback
        assert section == "safe_scheduler"
        return self.values.get(key, fallback)


def test_defaults():
    """The scheduler drains by default: its tasks' cleanup is 10 s, the drain what the 30 s deadline
    leaves after it, the servers' 5 s and three kills of 1 s; after an unplanned end, the tasks go
    on for a whole shutdown_timeout."""
    assert load({}, FakeConf()) == Settings(
        shutdown_timeout=30.0, child_stop_timeout=5.0, stall_timeout=60.0, task_drain_timeout=12.0,
        task_cleanup_timeout=10.0, orphaned_task_timeout=30.0, db_wait_timeout=600.0, db_timeouts=True,
        enable_health_check=True, health_check_server_host="0.0.0.0", health_check_server_port=8975,
        unhealthy_after=60.0,
    )


def test_config_then_cli_override():
    conf = FakeConf(shutdown_timeout="12", child_stop_timeout="2.5", stall_timeout="0", db_timeouts="False")
    loaded = load({}, conf)
    assert (loaded.shutdown_timeout, loaded.child_stop_timeout, loaded.stall_timeout, loaded.db_timeouts) == (
        12.0, 2.5, 0.0, False)
    assert (loaded.task_cleanup_timeout, loaded.task_drain_timeout) == (6.5, 0.0)  # 12 - 2.5 - 3 = 6.5 for the tasks
    overridden = load({"shutdown_timeout": "40", "stall_timeout": "15"}, conf)
    assert (overridden.shutdown_timeout, overridden.stall_timeout, overridden.unhealthy_after) == (40.0, 15.0, 15.0)
    assert (overridden.task_cleanup_timeout, overridden.task_drain_timeout) == (10.0, 24.5)


def test_stall_timeout_default_follows_the_health_check_threshold():
    assert load({}, FakeConf(health_threshold="45")).stall_timeout == 90.0


def test_liveness_endpoint_settings():
    assert load({}, FakeConf()).health_check_server_port == 8975
    assert load({}, FakeConf(), component="dag-processor").health_check_server_port == 8977
    conf = FakeConf(enable_health_check="False", health_check_server_host="127.0.0.1",
                    triggerer_health_check_server_port="9000", scheduler_health_check_server_port="9001")
    loaded = load({}, conf, component="triggerer")
    assert (loaded.enable_health_check, loaded.health_check_server_host, loaded.health_check_server_port) == (
        False, "127.0.0.1", 9000)
    # 503 after the stall timeout; with the watchdog off, after the default one (twice Airflow's threshold)
    assert load({"stall_timeout": "20"}, FakeConf()).unhealthy_after == 20.0
    assert load({"stall_timeout": "0"}, FakeConf(health_threshold="45")).unhealthy_after == 90.0
    with pytest.raises(UsageError, match="enable_health_check must be True or False"):
        load({}, FakeConf(enable_health_check="maybe"))


def test_bad_boolean():
    with pytest.raises(UsageError, match="db_timeouts must be True or False"):
        load({}, FakeConf(db_timeouts="maybe"))


def test_blank_config_value_means_default():
    assert load({}, FakeConf(shutdown_timeout=" ")).shutdown_timeout == 30.0


def test_zero_child_timeout_is_allowed_but_zero_shutdown_is_not():
    assert load({"child_stop_timeout": "0"}, FakeConf()).child_stop_timeout == 0.0
    with pytest.raises(UsageError, match="more than zero"):
        load({"shutdown_timeout": "0"}, FakeConf())


@pytest.mark.parametrize("raw", ["-1", "abc", "inf", "nan", ""])
def test_invalid_cli_values(raw):
    with pytest.raises(UsageError, match="--shutdown-timeout"):
        load({"shutdown_timeout": raw}, FakeConf())


def test_child_timeout_may_not_exceed_shutdown_timeout():
    with pytest.raises(UsageError, match=r"child_stop_timeout \(5s\) must not exceed shutdown_timeout \(6s\) "
                                         r"less two kills of 1s: at most 4s"):
        load({}, FakeConf(shutdown_timeout="6"))


def test_task_cleanup_is_fixed_and_the_drain_gets_the_rest():
    assert load({}, FakeConf(task_drain_timeout="10")).task_cleanup_timeout == 10.0
    assert load({}, FakeConf(task_drain_timeout="20")).task_cleanup_timeout == 2.0  # what 22 s leaves
    assert load({}, FakeConf(task_cleanup_timeout="7")).task_drain_timeout == 15.0
    short = load({"shutdown_timeout": "8", "child_stop_timeout": "2"}, FakeConf())
    assert (short.task_cleanup_timeout, short.task_drain_timeout) == (3.0, 0.0)


@pytest.mark.parametrize(
    ("drain", "cleanup"), [("0", "23"), ("23", None), ("20", "3")], ids=["cleanup", "drain", "both"],
)
def test_task_timeouts_must_fit_in_what_the_stop_gives_the_tasks(drain, cleanup):
    values = {"task_drain_timeout": drain} | ({"task_cleanup_timeout": cleanup} if cleanup else {})
    with pytest.raises(UsageError, match=r"must not exceed what shutdown_timeout \(30s\) leaves the tasks: 22s"):
        load({}, FakeConf(**values))


def test_the_issue_s_config_is_refused_with_the_real_figures():
    """Once accepted, yet the stop gave its tasks 23 s of the 25 s cleanup it promised."""
    with pytest.raises(UsageError, match=r"task_cleanup_timeout \(25s\).*leaves the tasks: 22s"):
        load({"shutdown_timeout": "30", "child_stop_timeout": "5", "task_cleanup_timeout": "25"}, FakeConf())


GRID = [(shutdown, child, drain, cleanup) for shutdown in (4.0, 10.0, 30.0) for child in (0.0, 2.0, 5.0)
        for drain in (None, 0.0, 3.0) for cleanup in (None, 1.0, 5.0, 20.0)]


@pytest.mark.parametrize(("shutdown", "child", "drain", "cleanup"), GRID)
def test_a_config_is_accepted_only_if_the_stop_honours_every_number(shutdown, child, drain, cleanup):
    """Accepted or refused: whatever is accepted, the stop's own arithmetic (the same ``TimePlan``
    that ``TaskStop`` and the runner spend) gives the tasks every second promised, and the servers'
    stop and the kills still fit. ``test_tasks.py`` measures it on a real task."""
    from safe_scheduler.shutdown.budget import KILL_RESERVE

    values = {"shutdown_timeout": str(shutdown), "child_stop_timeout": str(child)}
    values |= {k: str(v) for k, v in (("task_drain_timeout", drain), ("task_cleanup_timeout", cleanup)) if v is not None}
    try:
        loaded = load(values, FakeConf())
    except UsageError:
        room = shutdown - child - 3 * KILL_RESERVE
        assert room < 0 or (drain or 0) + (cleanup or 0) > room
        return
    plan = loaded.plan
    promised = loaded.task_drain_timeout + loaded.task_cleanup_timeout
    assert plan.tasks_may_take(loaded.shutdown_timeout) >= promised - 1e-9
    assert promised + KILL_RESERVE + plan.after_tasks <= loaded.shutdown_timeout + 1e-9
    assert cleanup is None or loaded.task_cleanup_timeout == cleanup
    assert drain is None or loaded.task_drain_timeout == drain


def test_orphaned_plan_adds_the_tasks_own_time_to_the_deadline():
    plan = load({}, FakeConf(orphaned_task_timeout="45")).plan.orphaned()
    assert (plan.shutdown_timeout, plan.task_drain_timeout) == (75.0, 45.0)
    idle = load({}, FakeConf(orphaned_task_timeout="45")).plan.orphaned(tasks_running=False)
    assert (idle.shutdown_timeout, idle.task_drain_timeout) == (30.0, 0.0)
    assert load({}, FakeConf()).plan.orphans_gone_within == 30.0 + 10.0 + 5.0 + 1.0


def test_celery_worker_defaults_fill_the_charts_grace():
    """The worker drains by default: 60 s of cleanup, the drain what the 585 s deadline leaves."""
    worker = load({}, FakeConf(), "celery-worker")
    assert (worker.shutdown_timeout, worker.task_cleanup_timeout, worker.task_drain_timeout) == (585.0, 60.0, 517.0)
    assert worker.stall_timeout == 60.0 and worker.health_check_server_port == 8978


@pytest.mark.parametrize(("shutdown", "cleanup", "drain"), [("120", 60.0, 52.0), ("30", 22.0, 0.0)])
def test_celery_worker_drain_follows_a_shorter_deadline(shutdown, cleanup, drain):
    """A shorter deadline (the overlay's, a user's) shortens the drain, then the cleanup: never a refusal."""
    worker = load({}, FakeConf(shutdown_timeout=shutdown), "celery-worker")
    assert (worker.task_cleanup_timeout, worker.task_drain_timeout) == (cleanup, drain)


def test_celery_worker_explicit_drain_is_kept_or_refused():
    assert load({"task_drain_timeout": "5"}, FakeConf(shutdown_timeout="30"), "celery-worker").task_drain_timeout == 5.0
    with pytest.raises(UsageError, match=r"must not exceed what shutdown_timeout \(30s\) leaves the tasks"):
        load({"task_drain_timeout": "40"}, FakeConf(shutdown_timeout="30"), "celery-worker")


def test_components_without_tasks_take_no_task_settings():
    triggerer = load({}, FakeConf(task_drain_timeout="1000"), "triggerer")
    assert (triggerer.task_drain_timeout, triggerer.task_cleanup_timeout, triggerer.orphaned_task_timeout) == (0, 0, 0)
