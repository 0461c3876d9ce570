"""The supervisor in-process with real worker processes: reloads that are one version for the
whole node, restarts that never miss one, and a port another gateway listens on.

Workers are stopped (SIGSTOP) or killed at chosen moments to put a reload and a restart in a
known order; the supervisor's deadlines are shortened where a test waits one out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from http_wire import RawClient, request
from recording_upstream import RecordingUpstream
from upstreams import free_port
from waiting import wait_until

from tollgate.config.loader import read_config
from tollgate.runtime import supervisor as supervisor_module
from tollgate.runtime.supervisor import EXIT_CANNOT_START, ReloadFailed, Supervisor

pytestmark = pytest.mark.timeout(90)

# Fresh interpreters importing the runtime on a loaded machine take seconds.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
REQUEST_ID_PREFIX = 16  # hex digits of a generated id that are random per worker process
# New connections tried to reach every worker: the kernel spreads them by a hash of the
# client's port, so missing one of two workers this often does not happen.
CONNECTIONS_TO_REACH_ALL = 200
WORKERS = 2

StartSupervisor = Callable[[dict[str, Any]], Awaitable[Supervisor]]


def versioned(upstream: RecordingUpstream, port: int, version: int) -> dict[str, Any]:
    """Two workers on `port`; route `main` serves /marker-<version> only in this version."""
    return {
        "gateway": {"listen": f"127.0.0.1:{port}", "workers": WORKERS, "drain_timeout": "5s"},
        "admin": {"listen": None},
        "logs": {"enabled": False},
        "upstreams": [{"name": "backend", "targets": [{"url": upstream.url}]}],
        "services": [
            {
                "name": "api",
                "upstream": "backend",
                "routes": [{"name": "main", "paths": [f"/marker-{version}"]}],
            }
        ],
    }


def write_config(path: Path, settings: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    partial.replace(path)


async def statuses_by_worker(port: int, path: str) -> dict[str, set[int]]:
    """The statuses of GET `path` over new connections, by worker, until every worker answered."""
    seen: dict[str, set[int]] = {}
    for _ in range(CONNECTIONS_TO_REACH_ALL):
        async with await RawClient.open(port) as client:
            await client.send(request("GET", path))
            response = await client.response()
        request_id = response.header("X-Request-Id")
        assert request_id is not None, response
        seen.setdefault(request_id[:REQUEST_ID_PREFIX], set()).add(response.status)
        if len(seen) == WORKERS:
            return seen
    raise AssertionError(f"only {len(seen)} of {WORKERS} workers answered")


async def assert_every_worker_serves(port: int, version: int, previous: int) -> None:
    for statuses in (await statuses_by_worker(port, f"/marker-{version}")).values():
        assert statuses == {200}
    for statuses in (await statuses_by_worker(port, f"/marker-{previous}")).values():
        assert statuses == {404}


def all_restarted(supervisor: Supervisor, old_pids: set[int | None]) -> Callable[[], bool]:
    return lambda: all(h.serving and h.pid not in old_pids for h in supervisor.workers)


@pytest.fixture
async def start_supervisor(tmp_path: Path) -> AsyncIterator[StartSupervisor]:
    """`await start_supervisor(settings)`: a supervisor running in this event loop on
    tmp_path/tollgate.yaml, once its workers are ready; stopped (drained) after the test."""
    running: list[tuple[Supervisor, asyncio.Task[int]]] = []

    async def start(settings: dict[str, Any]) -> Supervisor:
        path = tmp_path / "tollgate.yaml"
        write_config(path, settings)
        config, data = read_config(str(path))
        supervisor = Supervisor(str(path), config, data, "human", "warning")
        task = asyncio.create_task(supervisor.run())
        running.append((supervisor, task))
        started = asyncio.create_task(supervisor.started.wait())
        await asyncio.wait([task, started], timeout=START_TIMEOUT, return_when="FIRST_COMPLETED")
        started.cancel()
        assert supervisor.started.is_set(), f"the supervisor did not start: {task}"
        return supervisor

    yield start

    for supervisor, task in running:
        for handle in supervisor.workers:  # a worker a test stopped must be able to drain
            if handle.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGCONT)
        supervisor.stop()
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT)
        finally:
            for handle in supervisor.workers:
                if handle.process is not None and handle.process.returncode is None:
                    handle.process.kill()


# -- two phases --------------------------------------------------------------------------------


async def test_a_reload_that_one_worker_does_not_prepare_in_time_is_aborted_in_every_worker(
    upstream: RecordingUpstream,
    start_supervisor: StartSupervisor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Long enough for the worker that runs to prepare on a loaded machine.
    monkeypatch.setattr(supervisor_module, "RELOAD_TIMEOUT", 3.0)
    port = free_port()
    supervisor = await start_supervisor(versioned(upstream, port, 0))
    late = supervisor.workers[1].pid
    assert late is not None
    write_config(Path(supervisor.config_path), versioned(upstream, port, 1))

    os.kill(late, signal.SIGSTOP)
    try:
        with pytest.raises(ReloadFailed) as failed:
            await supervisor.reload()
    finally:
        os.kill(late, signal.SIGCONT)
    assert (supervisor.version, supervisor.reloads) == (1, 0)
    assert str(failed.value) == "worker 1: no answer in 3s; config version 1 keeps serving"
    # The worker that prepared in time serves the old config, as the late one does once it has
    # read the prepare and the abort.
    await assert_every_worker_serves(port, 0, previous=1)

    # The late worker's answer to the aborted reload is not taken for the next one's.
    assert await supervisor.reload() == 2
    await assert_every_worker_serves(port, 1, previous=0)


async def test_workers_that_dropped_a_prepared_config_before_its_commit_are_restarted_on_it(
    upstream: RecordingUpstream,
    start_supervisor: StartSupervisor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Workers hold a prepared config for no time at all: both drop it before the commit comes.
    monkeypatch.setattr(supervisor_module, "PREPARED_HOLD", 0.0)
    port = free_port()
    supervisor = await start_supervisor(versioned(upstream, port, 0))
    pids = {handle.pid for handle in supervisor.workers}
    write_config(Path(supervisor.config_path), versioned(upstream, port, 1))

    assert await supervisor.reload() == 2
    await wait_until(all_restarted(supervisor, pids), "both workers to be replaced")
    assert supervisor.restarts == WORKERS
    await assert_every_worker_serves(port, 1, previous=0)


# -- restarts and reloads --------------------------------------------------------------------


async def test_a_worker_restarted_during_a_reload_starts_on_the_version_it_committed(
    upstream: RecordingUpstream,
    start_supervisor: StartSupervisor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tollgate.supervisor")
    port = free_port()
    supervisor = await start_supervisor(versioned(upstream, port, 0))
    restarted, late = supervisor.workers
    restarted_pid, late_pid = restarted.pid, late.pid
    assert restarted_pid is not None and late_pid is not None
    write_config(Path(supervisor.config_path), versioned(upstream, port, 1))

    # Worker 1 is stopped, so the reload waits for it while worker 0 has prepared; then worker
    # 0 dies. Its restart begins while the reload is in flight: it must not start on the config
    # that was live when it died, nor miss the reload.
    os.kill(late_pid, signal.SIGSTOP)
    try:
        reload = asyncio.create_task(supervisor.reload())
        await wait_until(
            lambda: "worker 0 prepared config version 2" in caplog.text, "worker 0 to prepare"
        )
        process = restarted.process
        os.kill(restarted_pid, signal.SIGKILL)

        def restart_begun() -> bool:
            waiting = "worker 0 restarts when the reload in flight ends" in caplog.text
            return waiting or restarted.process is not process

        await wait_until(restart_begun, "worker 0's restart to begin")
    finally:
        os.kill(late_pid, signal.SIGCONT)
    assert await reload == 2

    await wait_until(all_restarted(supervisor, {restarted_pid}), "worker 0 to be restarted")
    assert supervisor.restarts == 1
    assert late.pid == late_pid
    await assert_every_worker_serves(port, 1, previous=0)


# -- the port --------------------------------------------------------------------------------


async def test_a_port_another_gateway_listens_on_is_refused_before_any_worker_starts(
    upstream: RecordingUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    # What another gateway's worker holds: a listening socket with SO_REUSEPORT, which a
    # worker of this one would join without a word.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        path = tmp_path / "tollgate.yaml"
        write_config(path, versioned(upstream, port, 0))
        config, data = read_config(str(path))
        supervisor = Supervisor(str(path), config, data, "human", "warning")

        assert await asyncio.wait_for(supervisor.run(), START_TIMEOUT) == EXIT_CANNOT_START
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in caplog.text
        assert supervisor.workers == []
        # The other gateway's socket still takes connections.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = other.accept()
            accepted.close()
