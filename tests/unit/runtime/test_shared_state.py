"""The node's shared state: the supervisor's file, the workers' view of it, the in-process one."""

from __future__ import annotations

from tollgate.ratelimit import FixedWindow
from tollgate.runtime.shared_state import STORE_FILE, NodeStateFile, SharedState

NOW = 1_700_000_000.0


def test_workers_opening_the_supervisors_file_share_one_count() -> None:
    node = NodeStateFile.create(capacity=128)
    first = SharedState(str(node.path), capacity=1)  # an opened file keeps its own capacity
    second = SharedState(str(node.path), capacity=1)
    try:
        assert node.path.name == STORE_FILE
        assert node.path.parent.stat().st_mode & 0o777 == 0o700
        limit = [("acme", FixedWindow(2, 60))]
        assert first.store().hit(limit, NOW, 1).decision.allowed
        assert second.store().hit(limit, NOW, 1).decision.allowed
        assert not first.store().hit(limit, NOW, 1).decision.allowed
        assert first.store().capacity == second.store().capacity >= 128
    finally:
        first.close()
        second.close()
        node.remove()
    assert not node.path.parent.exists()


def test_an_in_process_state_makes_its_file_on_first_use_and_removes_it_on_close() -> None:
    state = SharedState(None, capacity=64, locking=False)
    store = state.store()
    assert state.store() is store
    assert store.path.name == STORE_FILE
    assert store.path.exists()
    state.close()
    assert not store.path.parent.exists()
    state.close()  # twice is harmless


def test_a_state_never_used_makes_no_file() -> None:
    state = SharedState(None, capacity=64)
    state.close()
    assert "store=None" in repr(state)
