"""Run `loratool` commands fast and in isolation: a fork server.

Spawning ``python -m loratool`` per case costs 0.5-3 s of imports (torch). Calling ``main()`` in
the harness's own process is fast but shares everything with it: a FIFO or ``/dev/zero`` read
blocks or eats memory without a way out, merge worker threads outlive a timeout, and module state
leaks from one case into the next.

So one server process (``python -m tests.fuzz.runner``) imports loratool and torch once, then forks
a child per case. The child looks like a fresh ``loratool`` process (its own environment, working
directory, stdout/stderr files, a memory and file-size limit, a process group) and calls
``loratool.cli.main`` with ``LORATOOL_DEBUG=1`` so that an unexpected exception arrives with its
traceback (the CLI would print one ``internal error`` line and exit 70; the harness counts both the
same). A child still running at the deadline gets its stacks dumped by ``faulthandler`` and is
killed with its process group: that case is a HANG, and the next case starts from a clean fork.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

MEMORY_HEADROOM = 4 << 30  # address space a case may add to the server's (RLIMIT_AS)
FILE_SIZE_LIMIT = 512 << 20  # no fixture-sized output comes near this (RLIMIT_FSIZE)

# Imported once in the server so that forked children start warm. Missing ones are skipped: the
# library is edited while the harness runs.
WARM_MODULES = [
    "loratool.cli", "loratool.cli.inspect", "loratool.cli.validate", "loratool.cli.convert",
    "loratool.cli.resize", "loratool.cli.compose", "loratool.cli.merge", "loratool.cli.registry",
    "loratool.cli.render", "loratool.formats", "loratool.inspection", "loratool.validation",
    "loratool.convert", "loratool.resize", "loratool.compose", "loratool.merge", "loratool.merge.numpy_engine",
    "loratool.manifest", "loratool.fingerprint", "loratool.checkpoint", "loratool.registry.core",
    "loratool.schemas.reports", "torch", "numpy", "rich.console", "rich.table", "pydantic",
]


# -- the server -----------------------------------------------------------------------------------

def _vsz() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(req: dict) -> None:
    """In the forked child: become a `loratool` process, run the command, write result.json."""
    import faulthandler
    import io
    import resource
    import tempfile
    import traceback

    logs = Path(req["logs"])
    os.setpgid(0, 0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a runaway write fails with EFBIG instead
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(logs / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    # what Python gives a process whose stdout/stderr are pipes, in a UTF-8 locale
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="strict")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    os.environ.clear()
    os.environ.update(req["env"])
    tempfile.tempdir = None  # TMPDIR changed
    os.chdir(req["cwd"])
    soft_as = _vsz() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (soft_as, resource.getrlimit(resource.RLIMIT_AS)[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    hang = open(logs / "hang.txt", "w")  # noqa: SIM115 - open until the child exits (faulthandler writes it)
    faulthandler.dump_traceback_later(max(0.5, req["timeout"] - 0.75), file=hang)
    sys.argv = ["loratool", *req["argv"]]

    result: dict = {"rc": None}
    try:
        import importlib

        module, func = req.get("entry", "loratool.cli:main").split(":")
        main = getattr(importlib.import_module(module), func)
        main(list(req["argv"]))
        result["rc"] = 0
    except SystemExit as e:
        code = e.code
        result["rc"] = 0 if code is None else (code if isinstance(code, int) else 1)
    except BaseException as e:  # noqa: BLE001 - what main() let through (LORATOOL_DEBUG=1)
        result["rc"] = 70
        result["exception"] = type(e).__name__
        result["message"] = " ".join(str(e).split())[:500]
        result["traceback"] = traceback.format_exc()
        result["frames"] = [(fs.filename, fs.lineno, fs.name) for fs in traceback.extract_tb(e.__traceback__)]
    faulthandler.cancel_dump_traceback_later()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException as e:  # noqa: BLE001 - e.g. a lone surrogate left in the buffer
            result.setdefault("flush_error", f"{type(e).__name__}: {e}")
            result["rc"] = 70 if result["rc"] == 0 else result["rc"]
    with open(logs / "result.json", "w") as f:
        json.dump(result, f)
    os._exit(0)


def _wait(pid: int, timeout: float) -> tuple[str, int | None, float]:
    """("exited", code) / ("signaled", signal) / ("timeout", None), and the wall time."""
    t0 = time.monotonic()
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    wall = time.monotonic() - t0
    if not ready:
        time.sleep(0.8)  # let faulthandler's dump land (it fires 0.75 s before the deadline)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        return "timeout", None, wall
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signaled", os.WTERMSIG(status), wall
    return "exited", os.WEXITSTATUS(status), wall


def serve(warm: bool = True) -> None:
    import importlib

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol stream
    warmed, missing = [], []
    for name in WARM_MODULES if warm else []:
        try:
            importlib.import_module(name)
            warmed.append(name)
        except Exception as e:  # noqa: BLE001 - the library is being edited; start anyway
            missing.append(f"{name}: {type(e).__name__}: {e}")
    out.write(json.dumps({"ready": True, "missing": missing}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(req)
            finally:
                os._exit(99)
        status, code, wall = _wait(pid, req["timeout"])
        out.write(json.dumps({"status": status, "code": code, "wall": wall}) + "\n")
        out.flush()


# -- the client -----------------------------------------------------------------------------------

class Runner:
    """The harness's handle on the server: ``run(...)`` one case, restart the server if it dies."""

    def __init__(self, root: Path, env: dict[str, str], warm: bool = True):
        self.root = root
        self.env = env
        self.warm = warm
        self.proc: subprocess.Popen | None = None
        self.missing: list[str] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.runner", *([] if self.warm else ["--cold"])], cwd=self.root, env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        hello = self._read(300)
        if hello is None or not hello.get("ready"):
            self.close()
            raise RuntimeError("the fuzz runner did not start (run `python -m tests.fuzz.runner` to see why)")
        self.missing = hello["missing"]

    def _read(self, timeout: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, logs: Path, timeout: float,
            entry: str = "loratool.cli:main") -> dict:
        """Run one command (``entry(argv)``, the CLI unless a test says otherwise); returns the
        server's reply plus result.json (rc, exception, traceback)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        req = {"argv": argv, "env": env, "cwd": str(cwd), "logs": str(logs), "timeout": timeout, "entry": entry}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout + 30)
        if reply is None:  # the server itself is stuck or gone: count a hang, start afresh
            self.close()
            reply = {"status": "timeout", "code": None, "wall": timeout}
        result_file = logs / "result.json"
        if result_file.exists():
            reply["result"] = json.loads(result_file.read_text())
        return reply

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # no state worth a clean exit (torch's teardown takes seconds)
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc = None


if __name__ == "__main__":
    serve(warm="--cold" not in sys.argv[1:])
