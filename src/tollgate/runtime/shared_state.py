"""The node's shared state: one shared-memory store file that every worker of a node maps.

The supervisor makes the file once, before it starts workers, in a private directory of its
own (`NodeStateFile`), and names it in every worker's start message; reloads and restarted
workers keep the same file, so counters survive both. A worker opens it (`SharedState`) and
hands it to the policies it compiles. An in-process gateway (tests) has no supervisor: its
`SharedState` makes a file of its own the first time a policy asks for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from tollgate.ratelimit.shm import RECORD_SIZE, SharedMemoryStore

STORE_FILE: Final = "ratelimit.shm"
# Under tmpfs the mapped table is plain memory; on a disk the kernel would write it back.
_TMPFS: Final = "/dev/shm"


def _private_directory(capacity: int) -> Path:
    """A directory only this user can enter (mkdtemp makes it 0700), on tmpfs if it has room."""
    parent = None
    if os.path.isdir(_TMPFS) and os.access(_TMPFS, os.W_OK):
        space = os.statvfs(_TMPFS)
        if space.f_bavail * space.f_frsize > 2 * capacity * RECORD_SIZE:
            parent = _TMPFS
    return Path(tempfile.mkdtemp(prefix="tollgate-", dir=parent))


def _create_store(directory: Path, capacity: int, *, locking: bool) -> SharedMemoryStore:
    store = SharedMemoryStore.create(directory / STORE_FILE, capacity, locking=locking)
    try:
        # The file is sparse: a page the filesystem has no room for would kill the worker
        # touching it (SIGBUS). Reserve them all now, where running out is an OSError.
        fd = os.open(store.path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    except BaseException:
        store.close()
        raise
    return store


class NodeStateFile:
    """The supervisor's side: the store file it made, removed with its directory at exit."""

    __slots__ = ("_directory", "capacity", "path")

    def __init__(self, directory: Path, path: Path, capacity: int) -> None:
        """Use `create`."""
        self._directory = directory
        self.path = path
        self.capacity = capacity

    @classmethod
    def create(cls, capacity: int) -> NodeStateFile:
        directory = _private_directory(capacity)
        try:
            # The supervisor never counts: it only makes the file the workers open.
            store = _create_store(directory, capacity, locking=False)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        store.close()
        return cls(directory, store.path, capacity)

    def remove(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)

    def __repr__(self) -> str:
        return f"NodeStateFile({str(self.path)!r}, capacity={self.capacity})"


class SharedState:
    """A worker's side: the node's store, opened on first use (and made, if it has no file).

    `locking=False` when the worker is the node's only one: nothing else touches the table.
    """

    __slots__ = ("_capacity", "_directory", "_locking", "_path", "_store")

    def __init__(self, path: str | None, *, capacity: int, locking: bool = True) -> None:
        self._path = path
        self._capacity = capacity
        self._locking = locking
        self._store: SharedMemoryStore | None = None
        self._directory: Path | None = None  # made here, so removed here

    def store(self) -> SharedMemoryStore:
        store = self._store
        if store is None:
            if self._path is not None:
                store = SharedMemoryStore.open(self._path, locking=self._locking)
            else:
                self._directory = _private_directory(self._capacity)
                store = _create_store(self._directory, self._capacity, locking=self._locking)
            self._store = store
        return store

    @property
    def opened(self) -> bool:
        """Whether the store is open: something asked for it since it was made or closed."""
        return self._store is not None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __repr__(self) -> str:
        return f"SharedState(path={self._path!r}, locking={self._locking}, store={self._store!r})"
