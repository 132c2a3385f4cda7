"""tileattn.environment.env: os.environ.get's answers, including after changes at run time."""

import os

from tileattn.environment import env

NAME = "TILEATTN_TEST_SWITCH"


def test_env_follows_the_environment_as_it_changes(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env(NAME) is None and env(NAME, "1") == "1"
    monkeypatch.setenv(NAME, "0")
    assert env(NAME, "1") == "0"
    os.environ[NAME] = "héllo"  # encoded and decoded as os.environ does
    assert env(NAME) == "héllo" == os.environ.get(NAME)
    monkeypatch.setenv(NAME, "")
    assert env(NAME, "1") == ""
    monkeypatch.delenv(NAME)
    assert env(NAME, "1") == "1"
