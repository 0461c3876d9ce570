"""The supervisor: starts the workers, restarts crashed ones, reloads and drains them.

It is the control plane of one node: it owns the config file, validates and compiles every new
version before any worker sees it, serves the admin API, and talks to each worker over a
private control socket. Workers are fresh interpreters (not forks of a process that runs an
event loop), each binding the data-plane port with SO_REUSEPORT.

A reload is one version for the whole node: every worker prepares it, and only if all did is
it committed, else aborted everywhere. Restarts take the reload lock too, so a worker always
starts on the newest committed version.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tollgate.config.schema import Config
from tollgate.errors import ConfigError
from tollgate.runtime.runtime import check_compiles
from tollgate.runtime.shared_state import NodeStateFile, SharedState
from tollgate.runtime.worker import Gateway, encode_message, probe_listen, read_message

if TYPE_CHECKING:
    from tollgate.observe.reports import Reports

log = logging.getLogger("tollgate.supervisor")

# Same as the CLI's: the gateway could not start (bad config, a port in use, ...).
EXIT_CANNOT_START = 2

# A worker that dies sooner than this after starting counts as crash-looping: wait longer.
CRASH_LOOP_WINDOW = 5.0
RESTART_BACKOFF_MAX = 10.0
START_TIMEOUT = 30.0
# For every worker to prepare a new config (compile it, load the certificate) and answer.
RELOAD_TIMEOUT = 30.0
# For every worker to commit it: a reference swap, so only a hung worker is late.
COMMIT_TIMEOUT = 10.0
# How long a worker keeps a prepared config for the commit: past both deadlines above, so
# that it drops only a config whose commit will not come.
PREPARED_HOLD = RELOAD_TIMEOUT + COMMIT_TIMEOUT
METRICS_TIMEOUT = 5.0


def worker_count(config: Config) -> int:
    workers = config.gateway.workers
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)


class ControlChannel:
    """The supervisor's end of one worker process's control socket.

    Answers to a request with an id (a reload phase, a metrics scrape) go to whoever waits for
    that id, whatever else is in flight; other messages (ready, failed) queue in `replies`. Once
    the worker is gone, its waits fail with ConnectionError, and so does every later request.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.open = True

    def send(self, message: dict[str, Any]) -> None:
        # Not drained: a stopped worker must not hold the supervisor up; the transport buffers.
        if self.open:
            self.writer.write(encode_message(message))

    def ask(self, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send `message`; the future gets the worker's answer carrying the same `id`."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if not self.open:
            future.set_exception(ConnectionError("the worker is gone"))
            return future
        request = int(message["id"])
        self.pending[request] = future
        # Answered, failed or given up (cancelled): a late answer finds nobody and is dropped.
        future.add_done_callback(lambda _: self.pending.pop(request, None))
        self.send(message)
        return future

    async def read(self) -> None:
        """Deliver the worker's messages until it is gone."""
        try:
            while True:
                message = await read_message(self.reader)
                if message is None:
                    return
                request = message.get("id")
                if request is None:
                    self.replies.put_nowait(message)
                    continue
                waiting = self.pending.get(int(request))
                if waiting is not None and not waiting.done():
                    waiting.set_result(message)
        finally:
            self.open = False
            for future in list(self.pending.values()):
                if not future.done():
                    future.set_exception(ConnectionError("the worker is gone"))
            self.replies.put_nowait({"type": "gone"})
            self.writer.close()

    def __repr__(self) -> str:
        state = "open" if self.open else "closed"
        return f"ControlChannel({state}, {len(self.pending)} pending)"


@dataclass
class WorkerHandle:
    slot: int
    process: asyncio.subprocess.Process | None = None
    # The control socket of the current process (a restart gives the slot a new one).
    channel: ControlChannel | None = None
    ready: bool = False  # the current process reported ready
    started_at: float = 0.0
    # The last metrics the worker reported: kept as a base if the process dies.
    last_metrics: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def serving(self) -> bool:
        """Its process started, runs, and its control socket is open."""
        process, channel = self.process, self.channel
        return (
            self.ready
            and process is not None
            and process.returncode is None
            and channel is not None
            and channel.open
        )


Answers = list[tuple[WorkerHandle, dict[str, Any]]]


async def _answers(
    asked: list[tuple[WorkerHandle, asyncio.Future[dict[str, Any]]]], within: float
) -> Answers:
    """Each worker's answer within one deadline for all, or what stands for it: a `gone`
    worker, or `no_answer` in time."""
    if asked:
        await asyncio.wait([future for _, future in asked], timeout=within)
    answers: Answers = []
    for handle, future in asked:
        if not future.done():
            future.cancel()
            answers.append((handle, {"type": "no_answer", "error": f"no answer in {within:g}s"}))
        elif (error := future.exception()) is not None:
            answers.append((handle, {"type": "gone", "error": str(error)}))
        else:
            answers.append((handle, future.result()))
    return answers


def _log_prepared(slot: int, version: int, answer: asyncio.Future[dict[str, Any]]) -> None:
    # As each answer comes: which workers a slow reload waits for shows in a debug log.
    if (
        not answer.cancelled()
        and answer.exception() is None
        and answer.result()["type"] == "prepared"
    ):
        log.debug("worker %d prepared config version %d", slot, version)


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
        self.started = asyncio.Event()  # set once every worker and the admin API are up
        # Held by a reload and by a worker's (re)start: never one during the other.
        self._reload_lock = asyncio.Lock()
        self._signals: list[int] = []
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

        request = {"type": "metrics", "id": next(self._request_ids)}
        for handle, reply in await _answers(self._ask(request), METRICS_TIMEOUT):
            if reply["type"] == "metrics":
                handle.last_metrics = reply["metrics"]
            else:
                # A busy or dying worker: its last report stands in (counters never go back).
                log.warning("worker %d did not report metrics: %s", handle.slot, reply["error"])
        snapshots = [h.last_metrics for h in self.workers if h.last_metrics is not None]
        merged = merge_snapshots([*snapshots, *self._retired_metrics])
        alive = sum(1 for h in self.workers if h.process and h.process.returncode is None)
        node = {"worker_restarts": self.restarts, "config_reloads": self.reloads, "workers": alive}
        return render(merged, node, __version__)

    # -- workers ---------------------------------------------------------------------------

    def _ask(
        self, message: dict[str, Any], handles: list[WorkerHandle] | None = None
    ) -> list[tuple[WorkerHandle, asyncio.Future[dict[str, Any]]]]:
        """Send `message` to each serving worker (of `handles`, by default all)."""
        asked = []
        for handle in self.workers if handles is None else handles:
            if handle.serving:
                assert handle.channel is not None
                asked.append((handle, handle.channel.ask(message)))
        return asked

    async def _spawn(self, handle: WorkerHandle) -> None:
        """Start the slot's worker on the current config. Called with the reload lock held
        (but at start-up, before any reload can come)."""
        handle.ready = False
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
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        channel = handle.channel = ControlChannel(reader, writer)
        handle.started_at = time.monotonic()
        assert self.shared_state is not None
        channel.send(
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
        self._track(channel.read())
        try:
            reply = await asyncio.wait_for(channel.replies.get(), START_TIMEOUT)
        except TimeoutError:
            reply = {"error": f"worker {handle.slot} did not start within {START_TIMEOUT:.0f}s"}
        if reply.get("type") != "ready":
            with contextlib.suppress(ProcessLookupError):
                handle.process.kill()  # never leave a half-started worker behind
            raise RuntimeError(reply.get("error") or f"worker {handle.slot} did not start")
        handle.ready = True
        self._track(self._watch(handle, handle.process))

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
        # A reload in flight ends first: the new worker starts on the newest committed config,
        # and no reload runs while it starts (it would not be asked, or be asked too early).
        if self._reload_lock.locked():
            log.info("worker %d restarts when the reload in flight ends", handle.slot)
        async with self._reload_lock:
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
        """Re-read the config file, validate and compile it, then swap it in every worker.

        In two phases: every worker prepares the new config (compiles it and loads its
        certificate, without serving them) and answers; only when all have does the supervisor
        tell them to commit (swap one reference). Otherwise it tells them to abort, the previous
        version keeps serving everywhere and ReloadFailed says which workers failed and why."""
        from tollgate.config.loader import read_config

        async with self._reload_lock:
            config, data = read_config(self.config_path)
            check_compiles(config, self.config_path)
            self._warn_restart_only(config)
            version = self.version + 1
            attempt = next(self._request_ids)  # names this reload in the commit or abort
            prepare = {
                "type": "prepare",
                "id": attempt,
                "config": data,
                "version": version,
                "source": self.config_path,
                "hold": PREPARED_HOLD,
            }
            # A worker that is not serving now (it died and waits for this lock to restart)
            # is not asked: it starts on whichever version this reload leaves committed.
            asked = self._ask(prepare)
            for handle, future in asked:
                future.add_done_callback(functools.partial(_log_prepared, handle.slot, version))
            answers = await _answers(asked, RELOAD_TIMEOUT)
            failures = [
                f"worker {handle.slot}: {reply.get('error', reply)}"
                for handle, reply in answers
                if reply["type"] != "prepared"
            ]
            participants = [handle for handle, _ in asked]
            if failures:
                for handle in participants:
                    if handle.channel is not None:
                        handle.channel.send({"type": "abort", "reload": attempt})
                raise ReloadFailed(
                    "; ".join(failures) + f"; config version {self.version} keeps serving"
                )
            self.version = version
            self.config = config
            self.data = data
            self.reloads += 1
            commit = {"type": "commit", "id": next(self._request_ids), "reload": attempt}
            for handle, reply in await _answers(self._ask(commit, participants), COMMIT_TIMEOUT):
                if reply["type"] != "committed":
                    self._replace_uncommitted(handle, reply)
            if self._inspector is not None:
                try:
                    self._inspector.reload(config, version)
                except ValueError as exc:  # compiled above already: not expected
                    log.error("the admin API's view of the new config failed: %s", exc)
            log.info("config version %d is live in %d workers", version, len(self.workers))
            return version

    def _warn_restart_only(self, config: Config) -> None:
        old, new = self.config.gateway, config.gateway
        if new.listen != old.listen or worker_count(config) != worker_count(self.config):
            log.warning("gateway.listen and gateway.workers change only on restart")
        if (new.tls is None) != (old.tls is None):
            log.warning("gateway.tls turned on or off changes only on restart")
        if new.shared_state != old.shared_state:
            log.warning("gateway.shared_state changes only on restart")

    def _replace_uncommitted(self, handle: WorkerHandle, reply: dict[str, Any]) -> None:
        """A worker that prepared the committed version but did not swap it in (its hold ran
        out, or it hangs) would serve the previous one: replace it. Its restart waits for the
        reload lock, so it starts on the committed version."""
        process = handle.process
        if reply["type"] == "gone" or process is None or process.returncode is not None:
            log.warning(
                "worker %d exited during the reload; it restarts on the new config", handle.slot
            )
            return
        log.error(
            "worker %d did not commit config version %d (%s); restarting it",
            handle.slot,
            self.version,
            reply.get("error", reply),
        )
        # One that answered drains first; one that did not is hung, and is killed.
        with contextlib.suppress(ProcessLookupError):
            if reply["type"] == "no_answer":
                process.kill()
            else:
                process.send_signal(signal.SIGTERM)

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
            loop = asyncio.get_running_loop()
            for signum in self._signals:
                loop.remove_signal_handler(signum)
            self._signals.clear()
            if self.shared_state is not None:
                self.shared_state.remove()

    def stop(self) -> None:
        """Drain the workers and end `run`, as SIGTERM does."""
        self._stopped.set()

    def _on_signal(self, signum: int, handler: Any) -> None:
        asyncio.get_running_loop().add_signal_handler(signum, handler)
        self._signals.append(signum)

    async def _run(self) -> int:
        count = worker_count(self.config)
        listen = self.config.gateway.listen
        try:
            # The workers bind with SO_REUSEPORT, which would let them join the listening
            # sockets of another gateway of the same user: refuse a port that is taken.
            probe_listen(listen)
        except OSError as exc:
            reason = exc.strerror.lower() if exc.strerror else str(exc)
            log.error("cannot listen on %s: %s", listen, reason)
            return EXIT_CANNOT_START
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
            self._on_signal(signum, self._stopped.set)
        self._on_signal(signal.SIGHUP, lambda: self._track(self._reload_on_signal()))
        self.started.set()
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
