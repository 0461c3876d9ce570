"""The gateway driven by the HTTP clients people use: curl, httpx (sync and async), aiohttp and
requests. Each does a GET, a POST with a JSON body, a chunked upload and a streaming download,
and checks the status, the body bytes and a response header.

The gateway and its upstream (`AppUpstream`) run on uvloop in a thread of their own; the tests
are synchronous, and an asynchronous client runs each call in an event loop of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
import pytest
import requests
import uvloop
from upstreams import AppUpstream, download_bytes

from tollgate.config.loader import parse_config_data
from tollgate.runtime.worker import Gateway

API_KEY = "e2e-client-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START_TIMEOUT = 10.0
CLIENT_TIMEOUT = 10.0

PAYLOAD = {"order": 42, "items": ["tea", "café"], "express": True}
# 512 KiB in uneven pieces: more than the listener buffers before the upstream is connected.
UPLOAD_PIECES = [bytes([n]) * (48 * 1024 + n) for n in range(10)]
UPLOAD = b"".join(UPLOAD_PIECES)
DOWNLOAD_SIZE = 3 * 1024 * 1024 + 17


class GatewayThread:
    """An `AppUpstream` and a key-auth protected gateway in front of it, on their own loop."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the gateway thread did not start in time")
        if self._failure is not None:
            raise RuntimeError("the gateway thread failed to start") from self._failure

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        try:
            uvloop.run(self._serve())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with AppUpstream() as upstream:
            config = {
                "gateway": {"listen": "127.0.0.1:0"},
                "admin": {"listen": None},
                "upstreams": [{"name": "app", "targets": [{"url": upstream.url}]}],
                "services": [
                    {
                        "name": "shop",
                        "upstream": "app",
                        "routes": [{"name": "all", "paths": ["/"]}],
                        "policies": [{"key-auth": {}}],
                    }
                ],
                "consumers": [{"name": "e2e", "keys": [API_KEY]}],
            }
            gateway = Gateway(parse_config_data(config))
            await gateway.start()
            self.port = gateway.port
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await gateway.close()


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    served = GatewayThread()
    served.start()
    try:
        yield served.url
    finally:
        served.stop()


# -- one adapter per client ------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client(Protocol):
    def get(self, url: str) -> Reply: ...

    def post_json(self, url: str, payload: Any) -> Reply: ...

    def upload_chunked(self, url: str, pieces: list[bytes]) -> Reply: ...

    def download(self, url: str) -> Reply: ...


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


class Curl:
    """The curl command line, one process per request."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def _run(self, url: str, *options: str) -> Reply:
        head = self.tmp_path / "head.txt"
        body = self.tmp_path / "body.bin"
        command = ["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT), "-D", str(head)]
        command += ["-o", str(body), "-H", f"Authorization: Bearer {API_KEY}", *options, url]
        completed = subprocess.run(
            command, capture_output=True, timeout=CLIENT_TIMEOUT + 5, check=True
        )
        assert completed.stderr == b""
        lines = head.read_bytes().decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        return Reply(status, headers, body.read_bytes())

    def get(self, url: str) -> Reply:
        return self._run(url)

    def post_json(self, url: str, payload: Any) -> Reply:
        data = json.dumps(payload)
        return self._run(url, "-H", "Content-Type: application/json", "--data-binary", data)

    def upload_chunked(self, url: str, pieces: list[bytes]) -> Reply:
        source = self.tmp_path / "upload.bin"
        source.write_bytes(b"".join(pieces))
        return self._run(
            url,
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{source}",
        )

    def download(self, url: str) -> Reply:
        return self._run(url, "--no-buffer")


class HttpxSync:
    def get(self, url: str) -> Reply:
        with httpx.Client(headers=AUTH, timeout=CLIENT_TIMEOUT) as client:
            response = client.get(url)
        return Reply(response.status_code, _lower(response.headers), response.content)

    def post_json(self, url: str, payload: Any) -> Reply:
        with httpx.Client(headers=AUTH, timeout=CLIENT_TIMEOUT) as client:
            response = client.post(url, json=payload)
        return Reply(response.status_code, _lower(response.headers), response.content)

    def upload_chunked(self, url: str, pieces: list[bytes]) -> Reply:
        with httpx.Client(headers=AUTH, timeout=CLIENT_TIMEOUT) as client:
            response = client.post(url, content=iter(pieces))  # an iterator is sent chunked
        return Reply(response.status_code, _lower(response.headers), response.content)

    def download(self, url: str) -> Reply:
        with (
            httpx.Client(headers=AUTH, timeout=CLIENT_TIMEOUT) as client,
            client.stream("GET", url) as response,
        ):
            body = b"".join(response.iter_bytes())
        return Reply(response.status_code, _lower(response.headers), body)


class HttpxAsync:
    """httpx.AsyncClient, each call in an event loop of its own."""

    def get(self, url: str) -> Reply:
        return asyncio.run(self._call("GET", url))

    def post_json(self, url: str, payload: Any) -> Reply:
        return asyncio.run(self._call("POST", url, json=payload))

    def upload_chunked(self, url: str, pieces: list[bytes]) -> Reply:
        async def produce() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return asyncio.run(self._call("POST", url, content=produce()))

    def download(self, url: str) -> Reply:
        return asyncio.run(self._download(url))

    async def _call(self, method: str, url: str, **options: Any) -> Reply:
        async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as client:
            response = await client.request(method, url, **options)
        return Reply(response.status_code, _lower(response.headers), response.content)

    async def _download(self, url: str) -> Reply:
        async with (
            httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as client,
            client.stream("GET", url) as response,
        ):
            body = b"".join([piece async for piece in response.aiter_bytes()])
        return Reply(response.status_code, _lower(response.headers), body)


class Aiohttp:
    """aiohttp.ClientSession, each call in an event loop of its own."""

    def get(self, url: str) -> Reply:
        return asyncio.run(self._call("GET", url))

    def post_json(self, url: str, payload: Any) -> Reply:
        return asyncio.run(self._call("POST", url, json=payload))

    def upload_chunked(self, url: str, pieces: list[bytes]) -> Reply:
        async def produce() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return asyncio.run(self._call("POST", url, data=produce()))

    def download(self, url: str) -> Reply:
        return asyncio.run(self._download(url))

    def _session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        return aiohttp.ClientSession(headers=AUTH, timeout=timeout)

    async def _call(self, method: str, url: str, **options: Any) -> Reply:
        async with self._session() as session, session.request(method, url, **options) as response:
            return Reply(response.status, _lower(response.headers), await response.read())

    async def _download(self, url: str) -> Reply:
        async with self._session() as session, session.get(url) as response:
            body = b"".join([piece async for piece in response.content.iter_chunked(65536)])
            return Reply(response.status, _lower(response.headers), body)


class Requests:
    def get(self, url: str) -> Reply:
        response = requests.get(url, headers=AUTH, timeout=CLIENT_TIMEOUT)
        return Reply(response.status_code, _lower(response.headers), response.content)

    def post_json(self, url: str, payload: Any) -> Reply:
        response = requests.post(url, json=payload, headers=AUTH, timeout=CLIENT_TIMEOUT)
        return Reply(response.status_code, _lower(response.headers), response.content)

    def upload_chunked(self, url: str, pieces: list[bytes]) -> Reply:
        # A generator body has no length: requests sends it chunked.
        response = requests.post(
            url, data=(piece for piece in pieces), headers=AUTH, timeout=CLIENT_TIMEOUT
        )
        return Reply(response.status_code, _lower(response.headers), response.content)

    def download(self, url: str) -> Reply:
        with requests.get(url, headers=AUTH, timeout=CLIENT_TIMEOUT, stream=True) as response:
            body = b"".join(response.iter_content(chunk_size=65536))
        return Reply(response.status_code, _lower(response.headers), body)


CLIENTS = ["curl", "httpx-sync", "httpx-async", "aiohttp", "requests"]


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Client:
    adapters: dict[str, Client] = {
        "curl": Curl(tmp_path),
        "httpx-sync": HttpxSync(),
        "httpx-async": HttpxAsync(),
        "aiohttp": Aiohttp(),
        "requests": Requests(),
    }
    return adapters[request.param]


# -- the calls -------------------------------------------------------------------------------


def test_get_returns_the_upstream_json(gateway_url, client):
    reply = client.get(f"{gateway_url}/json?page=2")
    assert reply.status == 200
    body = reply.json()
    assert body["ok"] is True
    assert (body["path"], body["query"]) == ("/json", "page=2")
    assert reply.headers["x-upstream"] == "app"
    assert reply.headers["content-length"] == str(len(reply.body))
    assert reply.headers["x-request-id"]


def test_post_with_a_json_body_reaches_the_upstream_intact(gateway_url, client):
    reply = client.post_json(f"{gateway_url}/echo", PAYLOAD)
    assert reply.status == 200
    assert reply.json() == PAYLOAD
    assert reply.headers["content-type"].startswith("application/json")
    # What the upstream hashed is what came back: the body crossed the gateway unchanged.
    assert reply.headers["x-body-sha256"] == hashlib.sha256(reply.body).hexdigest()


def test_chunked_upload_is_streamed_to_the_upstream(gateway_url, client):
    reply = client.upload_chunked(f"{gateway_url}/echo", UPLOAD_PIECES)
    assert reply.status == 200
    assert reply.body == UPLOAD
    assert reply.headers["x-request-chunked"] == "True"
    assert reply.headers["x-body-sha256"] == hashlib.sha256(UPLOAD).hexdigest()


def test_streaming_download_arrives_whole_and_chunked(gateway_url, client):
    reply = client.download(f"{gateway_url}/download?size={DOWNLOAD_SIZE}")
    assert reply.status == 200
    assert reply.body == download_bytes(DOWNLOAD_SIZE)
    assert reply.headers["transfer-encoding"] == "chunked"
    assert reply.headers["x-upstream"] == "app"


def test_missing_key_is_refused_before_the_upstream(gateway_url):
    response = requests.get(f"{gateway_url}/json", timeout=CLIENT_TIMEOUT)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == 'Key realm="tollgate"'
