"""python -m tests.fuzz [--runs N] [--seed S] [--corpus] [--case I [--mutator M --command C] --keep DIR] [--json FILE]

Prints the counts per outcome and side effect, per mutation class and per command, and the
distinct failure causes with a reproducer each. Exit 1 when any run was INTERNAL, HANG,
PUBLISHED, OUTSIDE or INPUT-MODIFIED.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tests.fuzz.corpus import CORPUS
from tests.fuzz.harness import ASSERTED, REPO, quote_arg, run_fuzz


def _revision() -> str:
    """The commit, and whether loratool/ differs from it (the library is edited while fuzzing)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "loratool", "kernels"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (f" with uncommitted changes in {len(dirty.splitlines())} library files" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", "2000")))
    p.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "1")))
    p.add_argument("--fixtures", type=Path, default=Path(os.environ.get("LORATOOL_FIXTURES") or REPO / "fixtures" / "build"))
    p.add_argument("--case", type=int, action="append", help="Run only this case index (repeatable).")
    p.add_argument("--mutator", help="With --case: build it as this mutation class (a corpus entry), not the schedule's.")
    p.add_argument("--command", help="With --mutator: the command to run.")
    p.add_argument("--corpus", action="store_true", help="Also run the regression corpus (tests/fuzz/corpus.py).")
    p.add_argument("--keep", type=Path, help="With one --case: build the case in KEEP/root and leave it there.")
    p.add_argument("--build-only", action="store_true", help="With --keep: build the case, do not run it.")
    p.add_argument("--json", type=Path, help="Also write every run's result here.")
    p.add_argument("--workdir", type=Path, help="Where case folders go (default: a fresh temporary folder).")
    p.add_argument("--workers", type=int, default=int(os.environ.get("FUZZ_WORKERS", "2")),
                   help="Cases run side by side (one fork server each).")
    p.add_argument("-v", "--verbose", action="store_true", help="One line per run.")
    args = p.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # case details may hold lone surrogates (non-UTF-8 names)
        stream.reconfigure(errors="backslashreplace")
    if args.keep is not None and (not args.case or len(args.case) != 1):
        p.error("--keep needs exactly one --case")
    if args.mutator and (not args.case or not args.command):
        p.error("--mutator needs --case and --command")
    if not (args.fixtures / "llama_r8").exists():
        p.error(f"no fixtures in {args.fixtures}: run `make fixtures` first")

    def progress(r):
        if args.verbose or r.failing():
            print(f"[{r.index:5d}] {r.outcome:8} {','.join(r.effects):24} {r.mutator:28} {r.command:14} "
                  f"{r.wall:5.2f}s {r.cause or r.message[:80]}", file=sys.stderr, flush=True)

    report = run_fuzz(args.fixtures, args.runs, args.seed, workdir=args.workdir, only=args.case, keep=args.keep,
                      build_only=args.build_only, progress=progress, workers=args.workers,
                      extra=CORPUS if args.corpus else (), mutator=args.mutator, command=args.command)
    if args.keep is not None:
        r = report.results[0]
        root = args.keep / "root"
        print(f"case {r.index}: {r.mutator} [{r.command}]: {r.detail}\nin {root}:\n"
              f"  loratool {' '.join(quote_arg(a.replace('$ROOT', str(root))) for a in r.argv)}")
        if not args.build_only:
            print(f"  -> {r.outcome} exit {r.rc} {r.cause} {r.message}\n  effects: {r.effects}\n"
                  f"  stdout: {r.stdout[-500:]!r}\n  stderr: {r.stderr[-1000:]!r}\n"
                  f"  logs: {args.keep / 'logs'}")
            if r.trace:
                print(r.trace)
        return 0
    print(f"code under test: {_revision()}")
    print(report.text())
    if args.json:
        args.json.write_text(report.to_json())
    return 1 if any(report.counts().get(c) for c in ASSERTED) else 0


if __name__ == "__main__":
    sys.exit(main())
