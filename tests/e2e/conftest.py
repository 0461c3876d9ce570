"""End-to-end fixtures: the `tollgate` command as a real process tree, and a real upstream.

A gateway started here runs in its own process group, writes its output to files under the
test's tmp_path, and is killed with its whole group at teardown, whatever the test did.
Waiting is polling with a deadline, never a fixed sleep: process start-up on a loaded 2-core
machine varies too much to guess.

Fixtures: `upstream` (an `Upstream` on a free port), `start_upstream(port)`,
`start_gateway(config, *options)` (a `Gateway`) and `run_tollgate(*args, cwd=...)` for commands
that end by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from upstreams import free_port

HOST = "127.0.0.1"
# Two fresh interpreters importing pydantic and the runtime on a busy machine take seconds.
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
ADMIN_TOKEN = "admin-secret"


def _tollgate_command() -> tuple[str, ...]:
    # The script installed beside this interpreter is what users run; PATH may find another.
    script = Path(sys.executable).with_name("tollgate")
    return (str(script),) if script.exists() else (sys.executable, "-m", "tollgate")


TOLLGATE = _tollgate_command()


def _clean_environment() -> dict[str, str]:
    """The test's environment without the variables the example config reads."""
    return {
        name: value
        for name, value in os.environ.items()
        if name not in ("DEMO_KEY", "TOLLGATE_ADMIN_TOKEN")
    }


Condition = Callable[[], bool | Awaitable[bool]]


async def _poll(condition: Condition, within: float, what: str) -> None:
    """Check `condition` until it holds; fail naming `what` after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(POLL_INTERVAL)
    except TimeoutError:
        raise AssertionError(f"timed out after {within:.0f}s waiting for {what}") from None


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, so a reload never reads a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _config_text(config: Mapping[str, Any] | str) -> str:
    return config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)


# -- the upstream ---------------------------------------------------------------------------


class Upstream:
    """An aiohttp server in its own thread and event loop.

    `/slow?ms=N` answers after N milliseconds; every other path echoes the method, path and
    `X-Request-Id` as JSON. Of the slow requests, `arrived` counts all and `in_flight` those
    being answered right now.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.arrived = 0
        self.in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"Upstream({self.url}, arrived={self.arrived}, in_flight={self.in_flight})"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def config(
        self,
        *,
        workers: int = 1,
        token: str | None = ADMIN_TOKEN,
        drain_timeout: str = "10s",
        listen_port: int | None = None,
        admin_port: int | None = None,
    ) -> dict[str, Any]:
        """A small valid gateway config on free ports: route `main` proxies `/` here."""
        listen_port = listen_port or free_port()
        while admin_port is None or admin_port == listen_port:
            admin_port = free_port()
        admin: dict[str, Any] = {"listen": f"{HOST}:{admin_port}"}
        if token is not None:
            admin["token"] = token
        return {
            "version": 1,
            "gateway": {
                "listen": f"{HOST}:{listen_port}",
                "workers": workers,
                "drain_timeout": drain_timeout,
            },
            "admin": admin,
            "upstreams": [{"name": "backend", "targets": [{"url": self.url}]}],
            "services": [
                {"name": "api", "upstream": "backend", "routes": [{"name": "main", "paths": ["/"]}]}
            ],
        }

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/slow", self._slow)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port, backlog=1024).start()
        self.port = int(self._runner.addresses[0][1])

    async def _slow(self, request: web.Request) -> web.Response:
        milliseconds = int(request.query.get("ms", "1000"))
        self.arrived += 1
        self.in_flight += 1
        try:
            await asyncio.sleep(milliseconds / 1000)
        finally:
            self.in_flight -= 1
        return web.json_response({"slept_ms": milliseconds})

    async def _echo(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "request_id": request.headers.get("X-Request-Id"),
            }
        )


StartUpstream = Callable[[int], Upstream]


@pytest.fixture
def start_upstream() -> Iterator[StartUpstream]:
    started: list[Upstream] = []

    def start(port: int = 0) -> Upstream:
        server = Upstream(port)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def upstream(start_upstream: StartUpstream) -> Upstream:
    return start_upstream(0)


# -- the gateway process --------------------------------------------------------------------


@dataclass
class Gateway:
    """A running `tollgate serve` and where to reach it."""

    process: asyncio.subprocess.Process
    config_path: Path
    stderr_path: Path
    listen: str
    admin_listen: str | None
    token: str | None

    def __repr__(self) -> str:
        return f"Gateway(pid={self.process.pid}, {self.listen}, exit={self.process.returncode})"

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://{self.listen}{path}"

    def admin_url(self, path: str) -> str:
        assert self.admin_listen is not None, "this gateway has no admin listener"
        return f"http://{self.admin_listen}{path}"

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def rewrite_config(self, config: Mapping[str, Any] | str) -> None:
        _write_atomically(self.config_path, _config_text(config))

    def send_signal(self, signum: int) -> None:
        """To the supervisor alone: passing signals on to the workers is its job."""
        self.process.send_signal(signum)

    async def wait_for(
        self, condition: Condition, what: str, within: float = START_TIMEOUT
    ) -> None:
        """Poll `condition`; fail early, with the log, if the gateway exits meanwhile."""

        def alive_and_holds() -> bool | Awaitable[bool]:
            if self.process.returncode is not None:
                raise AssertionError(
                    f"tollgate exited with {self.process.returncode} while waiting for {what}:\n"
                    f"{self.stderr()}"
                )
            return condition()

        await _poll(alive_and_holds, within, what)

    async def wait_ready(self) -> None:
        """Until `/health` answers 200 (the supervisor opens the admin API last)."""
        async with aiohttp.ClientSession() as session:

            async def healthy() -> bool:
                try:
                    async with session.get(self.admin_url("/health")) as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await self.wait_for(healthy, f"{self.admin_listen}/health")

    async def wait_exit(self, within: float = EXIT_TIMEOUT) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            raise AssertionError(f"tollgate still runs after {within:.0f}s") from None

    async def accepts_connections(self) -> bool:
        """Whether a new TCP connection to the data plane gets through."""
        host, _, port = self.listen.rpartition(":")
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except ConnectionRefusedError:
            return False
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return True

    async def admin(self, method: str, path: str) -> tuple[int, Any]:
        """Call the admin API with the token; returns (status, JSON body)."""
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.admin_url(path), headers=self.admin_headers()) as reply,
        ):
            return reply.status, await reply.json()

    async def status(self) -> dict[str, Any]:
        code, body = await self.admin("GET", "/admin/status")
        assert code == 200, body
        assert isinstance(body, dict)
        return body

    async def worker_pids(self) -> list[int]:
        return [int(worker["pid"]) for worker in (await self.status())["workers"]]


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`await start_gateway(config, *options)` runs `tollgate serve -c tollgate.yaml *options`.

    `config` is a mapping (written as YAML), the file's text, or None for the file already in
    `cwd`; unless it is a mapping, pass `listen=` and `admin=` (host:port). With `wait=False` it
    returns at once, else when `/health` says ok.
    """
    started: list[Gateway] = []

    async def start(
        config: Mapping[str, Any] | str | None,
        *options: str,
        listen: str | None = None,
        admin: str | None = None,
        cwd: Path | None = None,
        wait: bool = True,
    ) -> Gateway:
        directory = cwd or tmp_path
        config_path = directory / "tollgate.yaml"
        if config is not None:
            _write_atomically(config_path, _config_text(config))
        name = f"tollgate-{len(started)}"
        with (
            (directory / f"{name}.stdout").open("wb") as stdout,
            (directory / f"{name}.stderr").open("wb") as stderr,
        ):
            process = await asyncio.create_subprocess_exec(
                *TOLLGATE,
                "serve",
                "-c",
                config_path.name,
                *options,
                cwd=directory,
                env=_clean_environment(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group, so teardown reaches the workers
            )
        mapping: Mapping[str, Any] = config if isinstance(config, Mapping) else {}
        gateway = Gateway(
            process,
            config_path,
            Path(stderr.name),
            listen or mapping.get("gateway", {}).get("listen", ""),
            admin or mapping.get("admin", {}).get("listen"),
            mapping.get("admin", {}).get("token"),
        )
        started.append(gateway)
        if wait:
            await gateway.wait_ready()
        return gateway

    yield start

    for gateway in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gateway.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gateway.process.wait(), EXIT_TIMEOUT)


@dataclass
class CommandResult:
    code: int
    stdout: str
    stderr: str


RunTollgate = Callable[..., Awaitable[CommandResult]]


async def _run_tollgate(*args: str, cwd: Path) -> CommandResult:
    process = await asyncio.create_subprocess_exec(
        *TOLLGATE,
        *args,
        cwd=cwd,
        env=_clean_environment(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), EXIT_TIMEOUT)
    except TimeoutError:
        command = " ".join(args)
        raise AssertionError(f"tollgate {command} still runs after {EXIT_TIMEOUT:.0f}s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    assert process.returncode is not None
    return CommandResult(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
def run_tollgate() -> RunTollgate:
    """`await run_tollgate(*args, cwd=...)`: a command that ends by itself (init, check)."""
    return _run_tollgate
