"""Makes the shared test helpers in tests/support importable from every test directory, and
keeps what gateways write (call records in `./tollgate.db` by default) out of the work tree."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

pytest_plugins = ("postgres_fixtures",)

_GATEWAY_TESTS = ("integration", "e2e")


@pytest.fixture(autouse=True)
def _run_gateways_in_tmp_path(request: pytest.FixtureRequest) -> None:
    """Integration and end-to-end tests run in their own temporary directory: a gateway's
    default storage (`sqlite:///./tollgate.db`) lands there, not in the repository."""
    if request.node.path.relative_to(Path(__file__).parent).parts[0] in _GATEWAY_TESTS:
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
