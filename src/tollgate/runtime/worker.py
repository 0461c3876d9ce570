"""A worker: one event loop serving the data plane with the current Runtime.

`Gateway` runs in any event loop (tests start it in-process); `run_worker` is the entry point
of a worker process started by the supervisor, which sends it its config and reload orders over
a control socket as length-prefixed JSON messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from tollgate.clock import SYSTEM_CLOCK, Clock
from tollgate.config.schema import Config
from tollgate.http.ids import reseed
from tollgate.http.server import ClientConnection
from tollgate.observe.metrics import WorkerMetrics
from tollgate.observe.recorder import CallRecorder, WorkerLogs
from tollgate.ratelimit.redis_store import RedisStore
from tollgate.runtime.runtime import PoolRegistry, PoolStage, Runtime, compile_config
from tollgate.runtime.shared_state import SharedState

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from tollgate.observe.tracing import Tracing

log = logging.getLogger("tollgate.worker")

# How often deadlines (header/body/keep-alive/upstream timeouts, idle pools) are checked: a
# fraction of the shortest configured timeout, so none fires later than ~25% past its time.
SWEEP_MIN = 0.05
SWEEP_MAX = 1.0
# How long cancelled request tasks get to finish their cleanup when the gateway closes.
CLOSE_TASKS_TIMEOUT = 1.0


def _sweep_interval(config: Config) -> float:
    limits = config.gateway.limits
    shortest = min(limits.header_timeout, limits.body_timeout, limits.keepalive_timeout)
    for upstream in config.upstreams:
        shortest = min(shortest, upstream.timeouts.read, upstream.timeouts.write)
    return max(SWEEP_MIN, min(SWEEP_MAX, shortest / 4))


class WorkerState:
    """What every connection of a worker shares: the current runtime, pools, bookkeeping."""

    def __init__(
        self, runtime: Runtime, pools: PoolRegistry, recorder: CallRecorder | None = None
    ) -> None:
        self.runtime = runtime
        self.pools = pools
        self.recorder = recorder  # where connections put call records; None: records are off
        self.tracing: Tracing | None = None  # traces of calls; None: tracing is off
        # What connections count, reported to the supervisor.
        self.metrics = WorkerMetrics(runtime.config.metrics.consumer_labels)
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.all_closed: asyncio.Event | None = None  # set by drain(), fired at the last close

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self.all_closed is not None:
            self.all_closed.set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log_exception("error in a request task", task.exception())

    def log_exception(self, message: str, exc: BaseException | None) -> None:
        log.error(message, exc_info=exc)

    def __repr__(self) -> str:
        return f"WorkerState({self.runtime!r}, {len(self.connections)} connections)"


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _bound_socket(listen: str, *, reuse_port: bool) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Connections of an earlier run still in TIME_WAIT must not keep the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listen_socket(listen: str, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; SO_REUSEPORT lets every worker bind the same port."""
    sock = _bound_socket(listen, reuse_port=reuse_port)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def probe_listen(listen: str) -> None:
    """OSError (EADDRINUSE) if a socket already listens on `listen`, whichever process made it.

    The probe binds without SO_REUSEPORT, which would let it join a listening group of the same
    user (another `tollgate serve`) instead of failing, and is closed at once."""
    _bound_socket(listen, reuse_port=False).close()


def _tls_context(config: Config) -> ssl.SSLContext | None:
    """The listener's TLS context with `gateway.tls`' certificate; ValueError naming the files
    if they cannot be loaded."""
    tls = config.gateway.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except OSError as exc:  # ssl.SSLError too: not PEM, or a key that does not match
        reason = exc.strerror or str(exc)
        raise ValueError(
            f"gateway.tls: cannot load the certificate {tls.cert} with the key {tls.key}: {reason}"
        ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context


RedisSettings = tuple[str, float, int]


@dataclass(slots=True)
class PreparedRuntime:
    """A runtime compiled for a reload that does not serve yet: `Gateway.commit` swaps it in,
    `Gateway.discard` closes what its compilation opened."""

    runtime: Runtime
    pools: PoolStage  # its pools: the new ones, and the new settings of the shared ones
    tls: ssl.SSLContext | None  # its certificate, loaded anew (None without `gateway.tls`)
    redis: tuple[RedisSettings, ...]  # the Redis stores made for it (settings not in use)
    opened_shared_state: bool  # it opened the node's store, which nothing had needed before

    def __repr__(self) -> str:
        return f"PreparedRuntime({self.runtime!r}, {self.pools!r}, tls={self.tls is not None})"


def policy_counts(runtime: Runtime) -> dict[str, dict[str, int]]:
    """Each rate-limit policy's counts in `runtime`, by policy (`service/route`)."""
    from tollgate.policies.rate_limit import RateLimit
    from tollgate.ratelimit.limiter import RedisLimiter

    counts: dict[str, dict[str, int]] = {}
    for route in runtime.routes:
        for policy in route.policies:
            if isinstance(policy, RateLimit):
                limiter = policy.limiter
                entry = {"rejections": limiter.rejected}
                if isinstance(limiter, RedisLimiter):
                    entry["store_fallbacks"] = limiter.fallbacks
                    entry["store_denials"] = limiter.denied
                counts[f"{route.service}/{route.name}"] = entry
    return counts


class Gateway:
    """The data plane of one worker: listener, runtime, reload and drain."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        shared_state: SharedState | None = None,
        worker: int = 0,
        workers: int = 1,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """`span_exporter` replaces the one `tracing` names (tests pass an in-memory one)."""
        self.pools = PoolRegistry()
        self.version = 1
        self.clock = clock  # what policies decide on (rate limits); tests pass a FakeClock
        # The node's store (`store: local`). In-process, with no supervisor to make one, the
        # gateway makes its own when a policy first asks for it; either way it closes it.
        self.shared_state = shared_state or SharedState(
            None, capacity=config.gateway.shared_state.capacity, locking=False
        )
        # This worker's connections to the cluster's Redis, by settings: kept across reloads
        # (counters live in Redis; a reload must not drop the connections).
        self._redis: dict[RedisSettings, RedisStore] = {}
        # Rate-limit counts of limiters replaced by reloads, by policy: metrics never go back.
        self._policy_base: dict[str, dict[str, int]] = {}
        runtime = self._compile(config, self.pools, self.version)
        self.state = WorkerState(runtime, self.pools)
        self.server: asyncio.Server | None = None
        # The context new TLS handshakes use (made in start(); a reload may replace it).
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_every = _sweep_interval(config)
        # Call records: made in start(), in the serving process (the writer is a thread).
        # `logs` is read at start only: changing it takes a restart.
        self.worker = worker  # this worker's number on its node, in records and file names
        self.workers = workers
        self.logs: WorkerLogs | None = None
        # Traces: made in start() too (the exporter's thread belongs to the serving process);
        # `tracing` is read at start only.
        self.tracing: Tracing | None = None
        self._span_exporter = span_exporter
        self._closed = False

    @property
    def runtime(self) -> Runtime:
        return self.state.runtime

    async def start(self, sock: socket.socket | None = None, *, reuse_port: bool = False) -> None:
        config = self.state.runtime.config
        if sock is None:
            sock = listen_socket(config.gateway.listen, reuse_port=reuse_port)
        tls = _tls_context(config)
        if tls is not None:
            # Each handshake is handed the current context: after a reload that changed the
            # certificate, new connections get the new one (those open keep theirs).
            tls.sni_callback = self._use_current_tls
        self._tls = tls
        scheme = b"https" if tls is not None else b"http"
        loop = asyncio.get_running_loop()
        if config.logs.enabled and self.logs is None:
            self.logs = WorkerLogs(
                config.logs, config.storage, worker=self.worker, workers=self.workers
            )
            self.logs.start()
            self.state.recorder = self.logs.recorder
        if config.tracing.enabled and self.tracing is None:
            from tollgate.observe.tracing import Tracing

            self.tracing = Tracing(
                config.tracing,
                worker=self.worker,
                exporter=self._span_exporter,
                runtime=lambda: self.state.runtime,
                scheme=scheme.decode(),
            )
            self.tracing.start()
            self.state.tracing = self.tracing
        self.server = await loop.create_server(
            lambda: ClientConnection(self.state, scheme), sock=sock, ssl=tls, backlog=2048
        )
        self._sweeper = loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _use_current_tls(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        current = self._tls
        if current is not None and current is not context:
            connection.context = current

    def reload(self, config: Config, version: int | None = None) -> Runtime:
        """Prepare and commit at once. On error the exception propagates and the old runtime
        stays."""
        return self.commit(self.prepare(config, version))

    def prepare(self, config: Config, version: int | None = None) -> PreparedRuntime:
        """Compile `config` (as `version`, by default the next) and load its certificate, without
        serving either: the serving runtime and its pools are untouched until `commit`.

        Raises ValueError (a route that does not compile, a certificate that does not load)
        having closed whatever the attempt opened."""
        stage = self.pools.stage()
        redis_before = set(self._redis)
        shared_state_was_open = self.shared_state.opened
        try:
            tls = _tls_context(config)  # checked even when TLS is not served (a restart would)
            runtime = self._compile(config, stage, self.version + 1 if version is None else version)
        except BaseException:
            self._release(stage, *self._opened_since(redis_before, shared_state_was_open))
            raise
        redis, opened_shared_state = self._opened_since(redis_before, shared_state_was_open)
        return PreparedRuntime(runtime, stage, tls, redis, opened_shared_state)

    def commit(self, prepared: PreparedRuntime) -> Runtime:
        """Swap the prepared runtime in: requests that begin from now on use it."""
        runtime = prepared.runtime
        # The old limiters' counts join the base: counters survive the swap.
        for policy, counts in policy_counts(self.state.runtime).items():
            base = self._policy_base.setdefault(policy, {})
            for name, value in counts.items():
                base[name] = base.get(name, 0) + value
        self.version = runtime.version
        self.state.runtime = runtime
        self.state.metrics.consumer_labels = runtime.config.metrics.consumer_labels
        prepared.pools.commit()  # targets gone from the config: their idle connections close now
        self._sweep_every = _sweep_interval(runtime.config)
        if prepared.tls is not None and self._tls is not None:
            # New handshakes get the new certificate. Turning TLS on or off would change the
            # listener itself: that takes a restart.
            self._tls = prepared.tls
        return runtime

    def discard(self, prepared: PreparedRuntime) -> None:
        """Drop a prepared runtime that will not serve, closing what only it had opened."""
        self._release(prepared.pools, prepared.redis, prepared.opened_shared_state)

    def _opened_since(
        self, redis_before: set[RedisSettings], shared_state_was_open: bool
    ) -> tuple[tuple[RedisSettings, ...], bool]:
        """What a compilation opened: the Redis stores it made, whether it opened the node's."""
        made = tuple(settings for settings in self._redis if settings not in redis_before)
        return made, not shared_state_was_open and self.shared_state.opened

    def _release(
        self, stage: PoolStage, redis: tuple[RedisSettings, ...], shared_state: bool
    ) -> None:
        stage.discard()
        for settings in redis:
            # Made by the compilation and never called (a store connects on its first call):
            # there is no connection to close.
            self._redis.pop(settings, None)
        if shared_state:
            self.shared_state.close()

    def report(self) -> dict[str, Any]:
        """This worker's metrics, for the supervisor to sum (`tollgate.observe.metrics`)."""
        report = self.state.metrics.snapshot()
        connections = self.state.connections
        gauges: dict[str, float] = {
            "open_connections": len(connections),
            "in_flight_requests": sum(1 for conn in connections if conn.cur is not None),
        }
        if self.logs is not None:
            stats = self.logs.pipeline.stats()
            gauges["log_queue_depth"] = stats.queue_depth
            gauges["log_records_dropped"] = stats.dropped
            gauges["log_records_written"] = stats.written
        report["gauges"] = gauges
        policies = {policy: dict(counts) for policy, counts in self._policy_base.items()}
        for policy, counts in policy_counts(self.state.runtime).items():
            into = policies.setdefault(policy, {})
            for name, value in counts.items():
                into[name] = into.get(name, 0) + value
        report["policies"] = policies
        return report

    def _compile(self, config: Config, pools: PoolRegistry | PoolStage, version: int) -> Runtime:
        return compile_config(
            config,
            pools,
            version=version,
            clock=self.clock,
            shared_store=self.shared_state.store,
            redis_store=self._redis_store(config),
        )

    def _redis_store(self, config: Config) -> Callable[[], RedisStore] | None:
        cluster = config.cluster
        url = cluster.redis
        if url is None:
            return None
        settings = (url, cluster.redis_timeout, cluster.redis_connections)

        def store() -> RedisStore:
            made = self._redis.get(settings)
            if made is None:
                made = self._redis[settings] = RedisStore(
                    url,
                    timeout=cluster.redis_timeout,
                    max_connections=cluster.redis_connections,
                    # Redis' own time, unless a test drives the gateway with a clock of its own.
                    clock=None if self.clock is SYSTEM_CLOCK else self.clock,
                )
            return made

        return store

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            now = time.monotonic()
            for conn in list(self.state.connections):
                conn.check_deadline(now)
            self.pools.sweep(now)
            if self.logs is not None:
                self.logs.recorder.sync_clock()
            if self.tracing is not None:
                self.tracing.sync_clock()

    async def drain(self, grace: float) -> bool:
        """Stop accepting, let in-flight requests finish up to `grace` seconds; True if all did."""
        self.state.draining = True
        self.state.all_closed = all_closed = asyncio.Event()
        if self.server is not None:
            self.server.close()
        for conn in list(self.state.connections):
            conn.drain()
        if self.state.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_closed.wait(), grace)
        finished = not self.state.connections
        await self.close()
        return finished

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.state.connections):
            conn.abort("gateway_shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pools.close()
        tasks = list(self.state.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # Their cleanup (a concurrency slot's release) still uses the store closed below.
            await asyncio.wait(tasks, timeout=CLOSE_TASKS_TIMEOUT)
        self.shared_state.close()
        for store in self._redis.values():
            await store.close()
        self._redis.clear()
        if self.logs is not None:
            # Aborted connections report their loss on the next loop iteration; their
            # exchanges' records must be queued before the pipeline stops taking any.
            await asyncio.sleep(0)
            await self.logs.aclose()
        if self.tracing is not None:
            # As above: the spans of exchanges cut short are built, then everything is exported.
            await asyncio.sleep(0)
            await self.tracing.aclose()

    def __repr__(self) -> str:
        return f"Gateway(version={self.version}, {self.state!r})"


# -- the worker process ---------------------------------------------------------------------

_HEADER = struct.Struct("!I")


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        head = await reader.readexactly(_HEADER.size)
        body = await reader.readexactly(_HEADER.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message: dict[str, Any] = orjson.loads(body)
    return message


def encode_message(message: dict[str, Any]) -> bytes:
    body = orjson.dumps(message)
    return _HEADER.pack(len(body)) + body


class WorkerControl:
    """A worker's side of the control socket once it serves: the phases of a reload, metrics
    and stop, one message at a time, each answered (but `abort` and `stop`) with its `id`.

    A reload comes in two phases. `prepare` compiles the new config without serving it and
    answers `prepared` or `prepare_failed`; `commit` then swaps it in (`committed`), or `abort`
    drops it. A prepared config not committed within the `hold` seconds the supervisor gave is
    dropped, and a late commit fails (`commit_failed`): the supervisor then restarts the worker.
    """

    def __init__(self, gateway: Gateway, stop: asyncio.Event) -> None:
        self.gateway = gateway
        self.stop = stop  # set by a `stop` message, or when the supervisor is gone
        # The prepared reload waiting for its commit, by its id, and the timer that drops it.
        self.prepared: tuple[int, PreparedRuntime] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Until the supervisor says stop or goes away (metrics are still answered in a drain)."""
        while True:
            message = await read_message(reader)
            if message is None:
                self.stop.set()  # the supervisor is gone: do not linger as an orphan
                return
            reply = self.handle(message)
            if reply is not None:
                writer.write(encode_message(reply))
                await writer.drain()
            if message.get("type") == "stop":
                return

    def handle(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Act on one message from the supervisor; the answer to send, if any."""
        kind = message.get("type")
        if kind == "prepare":
            reply = self._prepare(message)
        elif kind == "commit":
            reply = self._commit(int(message["reload"]))
        elif kind == "abort":
            self.drop(int(message["reload"]))
            return None
        elif kind == "metrics":
            reply = {"type": "metrics", "metrics": self.gateway.report()}
        elif kind == "stop":
            self.stop.set()
            return None
        else:
            log.warning("unknown control message %r", kind)
            return None
        reply["id"] = message.get("id")
        return reply

    def _prepare(self, message: dict[str, Any]) -> dict[str, Any]:
        from tollgate.config.loader import parse_config_data

        self.drop()  # reloads come one at a time: an earlier one still held will not commit
        try:
            config = parse_config_data(message["config"], message.get("source", "<config>"))
            prepared = self.gateway.prepare(config, int(message["version"]))
        except Exception as exc:
            return {"type": "prepare_failed", "error": str(exc)}
        reload = int(message["id"])
        self.prepared = (reload, prepared)
        hold = float(message["hold"])
        self._expiry = asyncio.get_running_loop().call_later(hold, self._expire, reload, hold)
        return {"type": "prepared", "version": prepared.runtime.version}

    def _commit(self, reload: int) -> dict[str, Any]:
        held = self.prepared
        if held is None or held[0] != reload:
            return {"type": "commit_failed", "error": "nothing prepared for this reload"}
        self._forget()
        runtime = self.gateway.commit(held[1])
        return {"type": "committed", "version": runtime.version}

    def _expire(self, reload: int, hold: float) -> None:
        held = self.prepared
        if held is not None and held[0] == reload:
            log.warning(
                "config version %d was prepared but not committed within %.0fs: dropped",
                held[1].runtime.version,
                hold,
            )
            self.drop(reload)

    def drop(self, reload: int | None = None) -> None:
        """Discard the prepared reload (only if it is `reload`, when given)."""
        held = self.prepared
        if held is not None and (reload is None or held[0] == reload):
            self._forget()
            self.gateway.discard(held[1])

    def _forget(self) -> None:
        self.prepared = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def __repr__(self) -> str:
        held = self.prepared
        return f"WorkerControl({self.gateway!r}, prepared={held[1] if held else None!r})"


async def _worker_main(control_fd: int) -> int:
    from tollgate.config.loader import parse_config_data

    loop = asyncio.get_running_loop()
    control = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_connection(sock=control)
    first = await read_message(reader)
    if first is None or first.get("type") != "start":
        return 3
    config = parse_config_data(first["config"], first.get("source", "<config>"))
    # The supervisor's file, locked unless this is the node's only worker and no admin API
    # (which reads and resets counters from the supervisor) can touch it.
    shared_state = SharedState(
        first["shared_state"],
        capacity=config.gateway.shared_state.capacity,
        locking=int(first["workers"]) > 1 or config.admin.listen is not None,
    )
    gateway = Gateway(
        config,
        shared_state=shared_state,
        worker=int(first.get("worker", 0)),
        workers=int(first["workers"]),
    )
    gateway.version = int(first.get("version", 1))
    try:
        await gateway.start(reuse_port=True)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError):
            error = f"cannot listen on {config.gateway.listen}: {exc.strerror or exc}"
        else:  # the certificate
            error = str(exc)
        writer.write(encode_message({"type": "failed", "error": error}))
        await writer.drain()
        return 4
    writer.write(encode_message({"type": "ready", "pid": os.getpid()}))
    await writer.drain()

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reloads come from the supervisor

    control_loop = WorkerControl(gateway, stop)
    control_task = loop.create_task(control_loop.run(reader, writer))
    await stop.wait()
    grace = gateway.runtime.config.gateway.drain_timeout
    finished = await gateway.drain(grace)
    control_task.cancel()
    control_loop.drop()  # a reload prepared and never committed: its pools close too
    if not finished:
        log.warning("drain timed out after %.1fs; open connections were closed", grace)
    return 0


def run_worker(control_fd: int, log_format: str = "human", log_level: str = "info") -> int:
    from tollgate.logging import setup_logging

    setup_logging(log_format, log_level)
    reseed()
    try:
        import uvloop

        return int(uvloop.run(_worker_main(control_fd)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(run_worker(int(sys.argv[1]), *sys.argv[2:4]))
