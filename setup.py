"""Build hook: compile the request-path modules with mypyc.

The data plane is plain, fully typed Python; mypyc turns these modules into C extensions that
run the same code about twice as fast (bench/hotpath.py measures it). Everything else stays
interpreted, but for two hand-written C modules, which say why: the shared-memory store's
locks, records and decisions (src/tollgate/ratelimit/_shmtable.c), and the metrics' duration
histograms (src/tollgate/observe/_durations.c). Set TOLLGATE_PURE_PYTHON=1 to skip
compilation (the package then runs the same modules as Python, slower); without a C compiler
the build falls back to that by itself.
"""

import os
import sys

from setuptools import Extension, setup

HOT_PATH = [
    "src/tollgate/http/exchange.py",
    "src/tollgate/http/headers.py",
    "src/tollgate/http/ids.py",
    "src/tollgate/http/paths.py",
    "src/tollgate/http/responses.py",
    "src/tollgate/http/server.py",
    "src/tollgate/http/upstream.py",
    "src/tollgate/observe/metrics.py",
    "src/tollgate/observe/recorder.py",
    "src/tollgate/observe/records.py",
    "src/tollgate/policies/key_lookup.py",
    # Not ratelimit/algorithms.py: compiled, it crashes the interpreter's garbage collector
    # (a freed object's weak reference) under the property tests; interpreted until found.
    "src/tollgate/ratelimit/headers.py",
    "src/tollgate/ratelimit/keys.py",
    "src/tollgate/ratelimit/limiter.py",
    "src/tollgate/ratelimit/redis_store.py",
    "src/tollgate/ratelimit/resp.py",
    "src/tollgate/ratelimit/shm.py",
    "src/tollgate/ratelimit/store.py",
    "src/tollgate/routing/router.py",
    "src/tollgate/runtime/context.py",
    "src/tollgate/runtime/entries.py",
    "src/tollgate/upstream/balancers.py",
]


def compiled_modules() -> list:
    if os.environ.get("TOLLGATE_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify

        # Hand-written C: the shared-memory store's stripe locks and record codec.
        table = Extension(
            "tollgate.ratelimit._shmtable",
            ["src/tollgate/ratelimit/_shmtable.c"],
            extra_compile_args=["-O2"],
        )
        # And the metrics' duration histograms.
        durations = Extension(
            "tollgate.observe._durations",
            ["src/tollgate/observe/_durations.c"],
            extra_compile_args=["-O2"],
        )
        return [*mypycify(HOT_PATH, opt_level="3", debug_level="0"), table, durations]
    except Exception as exc:  # no compiler, no mypyc: the pure-Python package still works
        print(f"tollgate: not compiling the request path ({exc})", file=sys.stderr)
        return []


setup(ext_modules=compiled_modules())
