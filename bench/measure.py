"""What every bench measures of a child process, in one place: its wall time, CPU time
(user + sys) and peak RSS (``wait4``'s ``ru_maxrss``), and its JSON stdout.

    from bench.measure import run_child
    r = run_child([sys.executable, "-m", "loratool", "compose", ..., "--json"], "loratool compose")
    r["wall_s"], r["cpu_s"], r["maxrss_mb"], r["data"]
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(cmd: list[str], label: str, check: bool = True, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` in the repository root (offline for the Hub); a failure stops the bench with
    the child's stderr unless ``check`` is False (then ``returncode`` says so)."""
    print(f"  running {label} ...", flush=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0 and check:
        raise SystemExit(f"{label} failed ({code}):\n{stderr[-3000:]}")
    try:
        data = json.loads(stdout) if stdout.strip().startswith("{") else {}
    except json.JSONDecodeError:
        data = {}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_mb": usage.ru_maxrss / 1024,
            "returncode": code, "data": data, "stderr": stderr}
