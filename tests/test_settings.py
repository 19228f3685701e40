"""Unit tests of the settings merge, with a stand-in for Airflow's config object."""

from __future__ import annotations

import pytest

from safe_scheduler import components, settings
from safe_scheduler.settings import Settings, UsageError


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
    assert load({}, FakeConf()) == Settings(
        shutdown_timeout=30.0, child_stop_timeout=5.0, stall_timeout=60.0, db_timeouts=True,
        task_drain_timeout=0.0, task_cleanup_timeout=23.0,
    )


def test_config_then_cli_override():
    conf = FakeConf(shutdown_timeout="12", child_stop_timeout="2.5", stall_timeout="0", db_timeouts="False")
    assert load({}, conf) == Settings(12.0, 2.5, 0.0, False, 0.0, 7.5)
    assert load({"shutdown_timeout": "40", "stall_timeout": "15"}, conf) == Settings(
        40.0, 2.5, 15.0, False, 0.0, 35.5, unhealthy_after=15.0)


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
    with pytest.raises(UsageError, match="must not exceed"):
        load({}, FakeConf(shutdown_timeout="3"))  # child default 5 > 3


def test_task_cleanup_gets_what_the_deadline_leaves_by_default():
    # 30 s deadline, no drain, 5 s for the servers, 2 x 1 s for the kills: 23 s for on_kill/on_termination.
    assert load({}, FakeConf()).task_cleanup_timeout == 23.0
    assert load({}, FakeConf(task_drain_timeout="10")).task_cleanup_timeout == 13.0
    assert load({"shutdown_timeout": "8", "child_stop_timeout": "2"}, FakeConf()).task_cleanup_timeout == 4.0
    assert load({}, FakeConf(task_cleanup_timeout="7")).task_cleanup_timeout == 7.0


@pytest.mark.parametrize(
    ("drain", "cleanup"), [("0", "26"), ("26", None), ("20", "6")], ids=["cleanup", "drain", "both"],
)
def test_task_timeouts_must_fit_in_the_deadline(drain, cleanup):
    values = {"task_drain_timeout": drain} | ({"task_cleanup_timeout": cleanup} if cleanup else {})
    with pytest.raises(UsageError, match="must not exceed shutdown_timeout"):
        load({}, FakeConf(**values))


def test_celery_worker_defaults_fill_the_charts_grace():
    """The worker drains by default: 60 s of cleanup, the drain what the 585 s deadline leaves."""
    worker = load({}, FakeConf(), "celery-worker")
    assert (worker.shutdown_timeout, worker.task_cleanup_timeout, worker.task_drain_timeout) == (585.0, 60.0, 518.0)
    assert worker.stall_timeout == 60.0 and worker.health_check_server_port == 8978
    assert worker.task_drain_timeout + worker.task_cleanup_timeout + worker.after_tasks + 1 <= 585.0


@pytest.mark.parametrize(("shutdown", "cleanup", "drain"), [("120", 60.0, 53.0), ("30", 23.0, 0.0)])
def test_celery_worker_drain_follows_a_shorter_deadline(shutdown, cleanup, drain):
    """A shorter deadline (the overlay's, a user's) shortens the drain, then the cleanup: never a refusal."""
    worker = load({}, FakeConf(shutdown_timeout=shutdown), "celery-worker")
    assert (worker.task_cleanup_timeout, worker.task_drain_timeout) == (cleanup, drain)


def test_celery_worker_explicit_drain_is_kept_or_refused():
    assert load({"task_drain_timeout": "5"}, FakeConf(shutdown_timeout="30"), "celery-worker").task_drain_timeout == 5.0
    with pytest.raises(UsageError, match="must not exceed shutdown_timeout"):
        load({"task_drain_timeout": "40"}, FakeConf(shutdown_timeout="30"), "celery-worker")
