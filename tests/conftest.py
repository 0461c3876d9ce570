"""Makes the shared test helpers in tests/support importable from every test directory, and
keeps what gateways write (call records in `./tollgate.db` by default) out of the work tree."""

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

pytest_plugins = ("postgres_fixtures",)

from otlp_collector import Collector  # noqa: E402  (tests/support, on the path just above)
from upstreams import StreamingUpstream  # noqa: E402


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    """An OTLP/HTTP trace collector (tests/support/otlp_collector.py), closed after the test."""
    server = Collector()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def streaming() -> AsyncIterator[StreamingUpstream]:
    """The call-load mix's streaming upstream (tests/support/call_load.py): a chunked answer of
    five lines, 0.1 s apart. Clients leave after its head; the line after they left meets
    their reset, the next one fails: the gateway learns it mid-answer."""
    server = StreamingUpstream(count=5, pause=0.1)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


_GATEWAY_TESTS = ("integration", "e2e")


@pytest.fixture(autouse=True)
def _run_gateways_in_tmp_path(request: pytest.FixtureRequest) -> None:
    """Integration and end-to-end tests run in their own temporary directory: a gateway's
    default storage (`sqlite:///./tollgate.db`) lands there, not in the repository."""
    if request.node.path.relative_to(Path(__file__).parent).parts[0] in _GATEWAY_TESTS:
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
