"""A throwaway `redis-server` for tests: a free loopback port, nothing saved, killable.

`RedisServer` starts the real binary (``apt install redis-server``), waits until it answers
PING, and can be stopped, killed (SIGKILL, as a crash) and started again on the same port, so
that tests can watch a client lose its server and find it again. `command` talks to it over
a plain blocking socket, independent of the client under test.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import hiredis

# Starting takes a few milliseconds; a loaded CI machine may take far longer.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str | None:
    """The path of `redis-server`, or None if it is not installed."""
    return shutil.which("redis-server")


def _encode(command: tuple[str | bytes | int | float, ...]) -> bytes:
    encoded = [
        argument if isinstance(argument, bytes) else str(argument).encode() for argument in command
    ]
    return b"*%d\r\n" % len(encoded) + b"".join(
        b"$%d\r\n%s\r\n" % (len(argument), argument) for argument in encoded
    )


# A cluster node also listens on its port + 10000 (the cluster bus): its port must leave room.
CLUSTER_BUS_OFFSET = 10000


def free_port(below: int = 65536) -> int:
    """A TCP port below `below` that nothing listens on right now, on 127.0.0.1."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < below:
            return port


class RedisServer:
    """One `redis-server` process on 127.0.0.1; `extra` arguments go on its command line.

    With a `password` the server requires it (`requirepass`) and `command` sends it.
    """

    def __init__(
        self, port: int | None = None, extra: tuple[str, ...] = (), password: str | None = None
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt install redis-server)")
        self.binary = binary
        cluster = "--cluster-enabled" in extra
        self.port = port or free_port(65536 - CLUSTER_BUS_OFFSET if cluster else 65536)
        self.extra = extra
        self.password = password
        self._directory = tempfile.TemporaryDirectory(prefix="tollgate-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password is not None else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    @property
    def directory(self) -> Path:
        """Where the server runs: its log, and room for files tests hand it (certificates)."""
        return Path(self._directory.name)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (on the same port as before, if it ran) and wait for PING."""
        if self.running:
            return
        arguments = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._directory.name,
            "--logfile",
            str(Path(self._directory.name) / "redis.log"),
            *(("--requirepass", self.password) if self.password is not None else ()),
            *self.extra,
        ]
        self._process = subprocess.Popen(
            arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self.log()}")
            try:
                if self.command("PING") == b"PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT} s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM) and wait for it to exit."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(STOP_TIMEOUT)
        self._process = None

    def kill(self) -> None:
        """Kill the server (SIGKILL, as if it crashed) and wait for it to exit."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Stop the process (SIGSTOP): connections stay open and nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def command(
        self, *arguments: str | bytes | int | float, db: int = 0, timeout: float = 5.0
    ) -> Any:
        """Send one command (on database `db`) and return its reply; an error reply is raised."""
        commands: list[tuple[str | bytes | int | float, ...]] = []
        if self.password is not None:
            commands.append(("AUTH", self.password))
        if db:
            commands.append(("SELECT", db))
        commands.append(arguments)
        reader = hiredis.Reader()
        replies: list[Any] = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as connection:
            connection.sendall(b"".join(_encode(command) for command in commands))
            while len(replies) < len(commands):
                data = connection.recv(65536)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                reader.feed(data)
                reply = reader.gets()
                while reply is not False:
                    replies.append(reply)
                    reply = reader.gets()
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise reply
        return replies[-1]

    def log(self) -> str:
        path = Path(self._directory.name) / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.kill()
        self._directory.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, {state})"
