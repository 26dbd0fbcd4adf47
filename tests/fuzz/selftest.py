"""Stand-ins for the CLI that misbehave on purpose, one per class: tests/test_fuzz.py runs them
through the harness to show that each failure is seen (a harness that calls everything ok would
let the fuzz test pass whatever loratool does).

Each takes the command line of a ``resize ADAPTER --rank 2 -o OUT`` case.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _out(argv: list[str]) -> Path:
    return Path(argv[argv.index("-o") + 1])


def _root(argv: list[str]) -> Path:
    return Path(argv[1]).parent


def ok(argv):
    print("fine")


def refuse(argv):
    print("loratool: warning: something to know", file=sys.stderr)
    print(f"loratool: error: {argv[1]}: refused", file=sys.stderr)
    sys.exit(2)


def report(argv):
    print("ERROR   LT100 check: bad\nFAIL: x: 1 modules, 1 errors, 0 warnings")
    sys.exit(1)


def two_lines(argv):
    print("loratool: error: one\nloratool: error: two", file=sys.stderr)
    sys.exit(2)


def crash(argv):
    raise ValueError("boom")


def traceback_text(argv):
    print("Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'x'", file=sys.stderr)
    sys.exit(1)


def hang(argv):
    time.sleep(120)


def publish(argv):
    _out(argv).mkdir()
    (_out(argv) / "adapter_config.json").write_text("{}")
    print("loratool: error: failed after writing", file=sys.stderr)
    sys.exit(2)


def outside(argv):
    (_root(argv) / "victim" / "notes.txt").write_text("overwritten\n")


def outside_transient(argv):
    p = _root(argv) / "victim" / "tmp"
    p.write_text("x")
    p.unlink()


def home_write(argv):
    (_root(argv) / "fakehome" / ".cache").mkdir()


def modify_input(argv):
    with open(Path(argv[1]) / "adapter_config.json", "a") as f:
        f.write(" ")


def leak(argv):
    out = _out(argv)
    out.mkdir()
    (out / "tokenizer.json").write_bytes((_root(argv) / "secret" / "secret.txt").read_bytes())


def symlink_out(argv):
    out = _out(argv)
    out.mkdir()
    (out / "tokenizer.json").symlink_to(_root(argv) / "secret" / "secret.txt")


def stray(argv):
    (_out(argv).parent / ".result.tmp").write_text("left behind")


def sibling(argv):
    (_root(argv).parent / "beside").write_text("x")


def lone_surrogate(argv):
    print("key \udc80")
