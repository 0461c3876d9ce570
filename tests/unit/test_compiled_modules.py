"""What the modules compiled with mypyc (setup.py's HOT_PATH) must not contain.

An `await` inside an `except` block: a compiled coroutine that suspends there leaves the error
it handles set as the thread's current exception, so that every exception raised later in that
thread carries it as `__context__` (the listener then mistook its own 400s and 431s for a
policy's failure and answered 500). The Redis client tests check the symptom; this finds the
construct before a build does.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compiled_modules() -> list[Path]:
    listed = re.findall(r'"(src/tollgate/[\w/]+\.py)"', (ROOT / "setup.py").read_text())
    return [ROOT / path for path in listed]


def test_the_compiled_modules_are_listed_and_exist() -> None:
    modules = compiled_modules()
    assert ROOT / "src/tollgate/http/server.py" in modules
    assert all(path.is_file() for path in modules)


def test_no_compiled_module_awaits_inside_an_except_block() -> None:
    found = []
    for path in compiled_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ExceptHandler):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Await | ast.AsyncFor | ast.AsyncWith):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert found == []
