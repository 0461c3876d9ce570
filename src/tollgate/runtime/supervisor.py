"""The supervisor: starts the workers, restarts crashed ones, reloads and drains them.

It is the control plane of one node: it owns the config file, validates and compiles every new
version before any worker sees it, serves the admin API, and talks to each worker over a
private control socket. Workers are fresh interpreters (not forks of a process that runs an
event loop), each binding the data-plane port with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tollgate.config.schema import Config
from tollgate.errors import ConfigError
from tollgate.runtime.runtime import check_compiles
from tollgate.runtime.shared_state import NodeStateFile, SharedState
from tollgate.runtime.worker import Gateway, encode_message, read_message

if TYPE_CHECKING:
    from tollgate.observe.reports import Reports

log = logging.getLogger("tollgate.supervisor")

# A worker that dies sooner than this after starting counts as crash-looping: wait longer.
# Same as the CLI's: the gateway could not start (bad config, a port in use, ...).
EXIT_CANNOT_START = 2

CRASH_LOOP_WINDOW = 5.0
RESTART_BACKOFF_MAX = 10.0
START_TIMEOUT = 30.0
RELOAD_TIMEOUT = 30.0
METRICS_TIMEOUT = 5.0


def worker_count(config: Config) -> int:
    workers = config.gateway.workers
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)


@dataclass
class WorkerHandle:
    slot: int
    process: asyncio.subprocess.Process | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    started_at: float = 0.0
    replies: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    # Requests awaiting the worker's answer, by the id they carry (metrics scrapes).
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    # The last metrics the worker reported: kept as a base if the process dies.
    last_metrics: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class ReloadFailed(Exception):
    pass


class Supervisor:
    def __init__(
        self,
        config_path: str,
        config: Config,
        data: dict[str, Any],
        log_format: str,
        log_level: str,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.data = data
        self.log_format = log_format
        self.log_level = log_level
        self.version = 1
        self.workers: list[WorkerHandle] = []
        self.stopping = False
        self.restarts = 0
        self.reloads = 0
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.admin: Any = None
        self.shared_state: NodeStateFile | None = None  # made by run(), before any worker
        # The config compiled here too, never serving: what the admin API reads rate-limit
        # counters through (the node's shared memory, the cluster's Redis). Made on first use.
        self._inspector: Gateway | None = None
        self._retired_metrics: list[dict[str, Any]] = []
        self._reports: Reports | None = None
        self._request_ids = itertools.count(1)

    def reports(self) -> Reports:
        """Analytics and record search on the live config's `storage` (made on first use)."""
        from tollgate.observe.reports import Reports

        if self._reports is None or self._reports.storage != self.config.storage:
            self._reports = Reports(self.config.storage)
        return self._reports

    def inspector(self) -> Gateway:
        """A gateway on the live config that never listens, for the admin API's reads."""
        if self._inspector is None:
            assert self.shared_state is not None
            shared = SharedState(
                str(self.shared_state.path), capacity=self.shared_state.capacity, locking=True
            )
            self._inspector = Gateway(self.config, shared_state=shared)
            self._inspector.version = self.version
        return self._inspector

    async def metrics(self) -> bytes:
        """`GET /metrics`: every worker's counters, summed, in Prometheus' text format."""
        from tollgate import __version__
        from tollgate.observe.metrics import merge_snapshots, render

        loop = asyncio.get_running_loop()
        asked = []
        for handle in self.workers:
            process = handle.process
            if handle.writer is None or process is None or process.returncode is not None:
                continue
            request = next(self._request_ids)
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            handle.pending[request] = future
            handle.writer.write(encode_message({"type": "metrics", "id": request}))
            asked.append((handle, future))
        for handle, future in asked:
            try:
                reply = await asyncio.wait_for(future, METRICS_TIMEOUT)
                handle.last_metrics = reply["metrics"]
            except (TimeoutError, ConnectionError) as exc:
                # A busy or dying worker: its last report stands in (counters never go back).
                log.warning("worker %d did not report metrics: %s", handle.slot, exc or "timeout")
        snapshots = [h.last_metrics for h in self.workers if h.last_metrics is not None]
        merged = merge_snapshots([*snapshots, *self._retired_metrics])
        alive = sum(1 for h in self.workers if h.process and h.process.returncode is None)
        node = {"worker_restarts": self.restarts, "config_reloads": self.reloads, "workers": alive}
        return render(merged, node, __version__)

    # -- workers ---------------------------------------------------------------------------

    async def _spawn(self, handle: WorkerHandle) -> None:
        parent, child = socket.socketpair()
        try:
            handle.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tollgate.runtime.worker",
                str(child.fileno()),
                self.log_format,
                self.log_level,
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        handle.reader, handle.writer = await asyncio.open_connection(sock=parent)
        handle.started_at = time.monotonic()
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        handle.replies = replies
        assert self.shared_state is not None
        handle.writer.write(
            encode_message(
                {
                    "type": "start",
                    "config": self.data,
                    "version": self.version,
                    "source": self.config_path,
                    "shared_state": str(self.shared_state.path),
                    # Counted from the slots, not the config: a reload never changes it.
                    "workers": len(self.workers),
                    "worker": handle.slot,  # its number in call records and file names
                }
            )
        )
        await handle.writer.drain()
        handle.pending = {}
        self._track(self._read_replies(handle.reader, replies, handle.pending))
        try:
            reply = await asyncio.wait_for(replies.get(), START_TIMEOUT)
        except TimeoutError:
            reply = {"error": f"worker {handle.slot} did not start within {START_TIMEOUT:.0f}s"}
        if reply.get("type") != "ready":
            with contextlib.suppress(ProcessLookupError):
                handle.process.kill()  # never leave a half-started worker behind
            raise RuntimeError(reply.get("error") or f"worker {handle.slot} did not start")
        self._track(self._watch(handle, handle.process))

    async def _read_replies(
        self,
        reader: asyncio.StreamReader,
        replies: asyncio.Queue[dict[str, Any]],
        pending: dict[int, asyncio.Future[dict[str, Any]]],
    ) -> None:
        # The queue is this process's own: a restart gives the handle a new one, and a late
        # "gone" from the dead worker must not land in it. Answers to a request with an id
        # (a metrics scrape) go to whoever waits for that id, whatever else is in flight.
        while True:
            message = await read_message(reader)
            if message is None:
                for future in pending.values():
                    if not future.done():
                        future.set_exception(ConnectionError("the worker is gone"))
                await replies.put({"type": "gone"})
                return
            request = message.get("id")
            if request is not None:
                waiting = pending.pop(int(request), None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(message)
                continue
            await replies.put(message)

    async def _watch(self, handle: WorkerHandle, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.stopping or handle.process is not process:
            return
        lived = time.monotonic() - handle.started_at
        log.error("worker %d (pid %d) exited with %s; restarting", handle.slot, process.pid, code)
        self.restarts += 1
        if handle.last_metrics is not None:
            # What it counted until the last scrape stays counted: counters never go back.
            self._retired_metrics.append(handle.last_metrics)
            handle.last_metrics = None
        delay = 0.0 if lived > CRASH_LOOP_WINDOW else min(RESTART_BACKOFF_MAX, 0.5 * self.restarts)
        await asyncio.sleep(delay)
        if self.stopping:
            return
        try:
            await self._spawn(handle)
            log.info("worker %d restarted as pid %s", handle.slot, handle.pid)
        except Exception as exc:
            log.error("restarting worker %d failed: %s", handle.slot, exc)
            # Watch the process the attempt left (killed, or the old one if none started):
            # watching `process` would see a different handle.process and never try again.
            assert handle.process is not None
            self._track(self._watch(handle, handle.process))  # try again after the backoff

    def _track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reload ----------------------------------------------------------------------------

    async def reload(self) -> int:
        """Re-read the config file, validate and compile it, then swap it in every worker."""
        from tollgate.config.loader import read_config

        async with self._reload_lock:
            config, data = read_config(self.config_path)
            check_compiles(config, self.config_path)
            if config.gateway.listen != self.config.gateway.listen or worker_count(
                config
            ) != worker_count(self.config):
                log.warning("gateway.listen and gateway.workers change only on restart")
            if config.gateway.shared_state != self.config.gateway.shared_state:
                log.warning("gateway.shared_state changes only on restart")
            version = self.version + 1
            message = encode_message(
                {"type": "reload", "config": data, "version": version, "source": self.config_path}
            )
            failures = []
            for handle in self.workers:
                if handle.writer is None:
                    continue
                handle.writer.write(message)
                await handle.writer.drain()
            for handle in self.workers:
                try:
                    reply = await asyncio.wait_for(handle.replies.get(), RELOAD_TIMEOUT)
                except TimeoutError:
                    reply = {"type": "reload_failed", "error": "no answer"}
                if reply.get("type") != "reloaded":
                    failures.append(f"worker {handle.slot}: {reply.get('error', reply)}")
            self.version = version
            self.config = config
            self.data = data
            self.reloads += 1
            if self._inspector is not None:
                try:
                    self._inspector.reload(config)
                    self._inspector.version = version
                except ValueError as exc:  # compiled above already: not expected
                    log.error("the admin API's view of the new config failed: %s", exc)
            if failures:
                raise ReloadFailed("; ".join(failures))
            log.info("config version %d is live in %d workers", version, len(self.workers))
            return version

    async def _reload_on_signal(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload rejected, the previous config keeps serving:\n%s", exc)
        except ReloadFailed as exc:
            log.error("reload failed: %s", exc)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            if self.shared_state is not None:
                self.shared_state.remove()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        count = worker_count(self.config)
        try:
            self.shared_state = NodeStateFile.create(self.config.gateway.shared_state.capacity)
        except OSError as exc:
            log.error("cannot make the node's shared state: %s", exc.strerror or exc)
            return EXIT_CANNOT_START
        self.workers = [WorkerHandle(slot) for slot in range(count)]
        try:
            for handle in self.workers:
                await self._spawn(handle)
        except Exception as exc:
            log.error("%s", exc)
            await self._stop_workers(0.0)
            return EXIT_CANNOT_START
        if self.config.admin.listen is not None:
            from tollgate.admin.server import start_admin

            try:
                self.admin = await start_admin(self, self.config.admin.listen)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                log.error("cannot listen on %s (admin): %s", self.config.admin.listen, reason)
                await self._stop_workers(0.0)
                return EXIT_CANNOT_START
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopped.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._track(self._reload_on_signal()))
        log.info(
            "tollgate serving on %s with %d worker(s) (pids %s)",
            self.config.gateway.listen,
            count,
            ", ".join(str(h.pid) for h in self.workers),
        )
        await self._stopped.wait()
        log.info("draining (up to %.0fs)", self.config.gateway.drain_timeout)
        await self._stop_workers(self.config.gateway.drain_timeout)
        if self.admin is not None:
            await self.admin.cleanup()
        if self._inspector is not None:
            await self._inspector.close()
        return 0

    async def _stop_workers(self, grace: float) -> None:
        self.stopping = True
        processes = [h.process for h in self.workers if h.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        waits = [p.wait() for p in processes if p.returncode is None]
        if waits:
            _done, pending = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=grace + 5.0
            )
            for process in processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for task in list(self._tasks):
            task.cancel()


def serve(
    config_path: str,
    config: Config,
    data: dict[str, Any],
    *,
    log_format: str = "human",
    log_level: str = "info",
) -> int:
    """Run the gateway in the foreground until SIGTERM or SIGINT; returns the exit code."""
    import uvloop

    async def main() -> int:
        supervisor = Supervisor(config_path, config, data, log_format, log_level)
        return await supervisor.run()

    return int(uvloop.run(main()))
