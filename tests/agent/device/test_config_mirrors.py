"""``[repository] mirrors`` (issue 24): a list of repository URLs tried before ``url``,
each checked, from the file or from ``EDGE_AGENT_REPOSITORY_MIRRORS`` (comma-separated)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.app import pass_deadlines
from agent.base.errors import ConfigError
from agent.cli import status_lines
from agent.device.config import load_config
from tests.agent.device.config_files import MINIMAL, write_config


def test_without_mirrors_the_url_is_the_only_source(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL), environ={})
    assert config.repository.mirrors == ()
    assert config.repository.sources == ("http://127.0.0.1:8080/",)


def test_mirrors_come_first_in_their_order_then_the_url(tmp_path: Path) -> None:
    text = MINIMAL + 'mirrors = ["http://gw.site:8080/repo", "https://cdn.example/r/"]\n'
    config = load_config(write_config(tmp_path, text), environ={})
    assert config.repository.sources == (
        "http://gw.site:8080/repo",
        "https://cdn.example/r/",
        "http://127.0.0.1:8080/",
    )
    # The watchdog's bound of one check does not grow with the sources it tries in turn:
    # each transfer renews it (agent.app.pass_deadlines).
    one = pass_deadlines(load_config(write_config(tmp_path, MINIMAL), environ={}))
    assert pass_deadlines(config).update_s == one.update_s


def test_mirrors_alone_need_no_url(tmp_path: Path) -> None:
    text = MINIMAL.replace('url = "http://127.0.0.1:8080/"\n', 'mirrors = ["http://gw:8080/"]\n')
    config = load_config(write_config(tmp_path, text), environ={})
    assert config.repository.sources == ("http://gw:8080/",)


def test_environment_sets_mirrors_comma_separated(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + 'mirrors = ["http://old/"]\n')
    env = {"EDGE_AGENT_REPOSITORY_MIRRORS": "http://gw:8080/repo , https://cdn.example/"}
    config = load_config(path, environ=env)
    assert config.repository.mirrors == ("http://gw:8080/repo", "https://cdn.example/")
    assert load_config(path, environ={"EDGE_AGENT_REPOSITORY_MIRRORS": ""}).repository.mirrors == ()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('mirrors = ["ftp://gw/"]\n', r"'repository.mirrors': entry 1 is not an http:// or https"),
        ('mirrors = ["http://a/", "gw"]\n', r"'repository.mirrors': entry 2 is not an http://"),
        ('mirrors = ["http://"]\n', r"entry 1 is not an http:// or https:// URL with a host"),
        ("mirrors = [1]\n", r"'repository.mirrors': expected a list of strings, got \[1\]"),
        ("mirrors = 5\n", r"'repository.mirrors': expected a list of strings, got 5"),
        (
            'mirrors = ["http://127.0.0.1:8080"]\n',
            r"'http://127.0.0.1:8080' is listed twice \(mirrors and url together\)",
        ),
        (
            'mirrors = ["http://gw/"]\ntransport = "mqtt"\n',
            r"'repository.mirrors': transport mqtt fetches through the broker only",
        ),
    ],
)
def test_bad_mirrors_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    path = write_config(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(path, environ={})
    assert str(exc.value).startswith(f"{path}: "), exc.value


def test_a_bad_mirror_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={"EDGE_AGENT_REPOSITORY_MIRRORS": "gw.site:8080"})
    assert str(exc.value).startswith("environment variable EDGE_AGENT_REPOSITORY_MIRRORS=")
    assert "entry 1 is not an http:// or https:// URL" in str(exc.value)


def test_edge_agent_status_shows_the_sources_that_failed_in_the_last_check() -> None:
    doc = {
        "device": "dev-1",
        "fleet": "lab",
        "repository": {
            "sources": ["http://gw:8080/", "http://central/"],
            "failed_last_check": ["http://gw:8080/: lin: length or hash mismatch: ..."],
        },
    }
    lines = status_lines(doc)
    assert (
        "repository source failed in the last update check: http://gw:8080/: lin: length or "
        "hash mismatch: ..." in lines
    ), lines
    quiet = status_lines({**doc, "repository": {"sources": [], "failed_last_check": []}})
    assert not any("repository" in line for line in quiet), quiet
