"""Cluster safety: joining a Ray cluster without token authentication warns loudly (stderr and log).

Ray 2.60 sets RAY_AUTH_MODE=token in the driver's environment during ``ray.init(address=...)``
when a token is available; ``init_ray`` calls the check after joining, so the variable reflects
what the connection actually used.
"""

from __future__ import annotations

import logging

import pytest

from sweeper import artifacts


@pytest.mark.parametrize("mode", [None, "", "disabled", "none", "k8s"])
def test_warns_without_token_auth(monkeypatch, capsys, caplog, mode):
    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    with caplog.at_level(logging.WARNING, logger="sweeper"):
        artifacts.warn_if_unauthenticated()
    err = capsys.readouterr().err
    assert err.startswith("WARNING: joined a Ray cluster without token authentication") and err.count("\n") == 1
    assert "docs/cluster.md" in err
    assert any("without token authentication" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["token", "TOKEN"])
def test_silent_with_token_auth(monkeypatch, capsys, mode):
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    artifacts.warn_if_unauthenticated()
    assert capsys.readouterr().err == ""


def test_init_ray_warns_only_when_joining(monkeypatch):
    """The check runs on the join path (address given) and not for an embedded local Ray."""
    import inspect

    from sweeper import runner

    src = inspect.getsource(runner.init_ray)
    join, _, local = src.partition("else:")
    assert "warn_if_unauthenticated" in join and "warn_if_unauthenticated" not in local
