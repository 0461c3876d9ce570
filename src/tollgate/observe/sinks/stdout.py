"""Call records as JSON lines on standard output: for containers whose platform collects logs.

One `write` per batch and a flush after it, so lines from one worker never interleave
mid-line (each batch is a single write of whole lines; pipes keep writes up to PIPE_BUF
atomic, and a batch larger than that is still whole lines from one process).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import BinaryIO

from tollgate.observe.records import RecordRow, record_to_json
from tollgate.observe.sinks import Sink

__all__ = ["StdoutSink"]


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    def write(self, batch: Sequence[RecordRow]) -> None:
        self._stream.write(b"".join(record_to_json(record) + b"\n" for record in batch))
        self._stream.flush()
