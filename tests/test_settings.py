"""Unit tests of the settings merge, with a stand-in for Airflow's config object."""

from __future__ import annotations

import pytest

from safe_scheduler.settings import Settings, UsageError, load


class FakeConf:
    def __init__(self, **values: str) -> None:
        self.values = values

    def get(self, section: str, key: str, fallback=None):
        assert section == "safe_scheduler"
        return self.values.get(key, fallback)


def test_defaults():
    assert load({}, FakeConf()) == Settings(shutdown_timeout=30.0, child_stop_timeout=5.0)


def test_config_then_cli_override():
    conf = FakeConf(shutdown_timeout="12", child_stop_timeout="2.5")
    assert load({}, conf) == Settings(12.0, 2.5)
    assert load({"shutdown_timeout": "40", "child_stop_timeout": None}, conf) == Settings(40.0, 2.5)


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
