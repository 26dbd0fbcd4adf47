"""The fuzz loop: build a case, snapshot the case folder, run the command, classify what happened.

Outcome of a run (exactly one):
  ok        exit 0
  refused   exit 1/2/3 with exactly one stderr line beginning ``loratool: error:`` (warning lines
            ``loratool: warning:`` may precede it), or validate's report with exit 1
  INTERNAL  exit 70, an exception that main() let through, a traceback in the output, or death by
            a signal
  HANG      still running after TIMEOUT seconds (killed with its process group)
  UNCLEAN   any other exit: several error lines, a usage message, exit 130, --json output that
            is not JSON
  SKIPPED   the case cannot run on this machine (the reason is printed; never silent)

Side effects of a run (any number, each counted):
  PUBLISHED       a non-zero exit, and the -o path (or its .loratool.json sidecar) was created or
                  replaced
  OUTSIDE         a file or folder created, modified or removed outside OUT and the scratch folder
                  (the victims, the secret, $HOME, the working directory, ROOT itself, pre-existing
                  entries in $LORATOOL_HOME when -o points there, files inside OUT that are not the
                  output); or a leak: a symlink in the output, or the token that marks every file
                  outside the inputs (the secret, the victims) in the output, in $LORATOOL_HOME's
                  store or in what the command printed
  INPUT-MODIFIED  an input file or folder (adapter, second adapter, base) changed
  STRAY           (not a failure) something new left in OUT next to the output, e.g. a temp file
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random

from tests.fuzz.mutators import Mutator, all_mutators
from tests.fuzz.runner import Runner
from tests.fuzz.workspace import COMMANDS, Fixtures, Workspace

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
PROGRESS_LINE = re.compile(r"loratool: [a-z]+: (\d+% \(|[\d.]+ [KMGT]?i?B, )")
OUTCOMES = ("ok", "refused", "INTERNAL", "HANG", "UNCLEAN", "SKIPPED")
EFFECTS = ("PUBLISHED", "OUTSIDE", "INPUT-MODIFIED", "STRAY")
ASSERTED = ("INTERNAL", "HANG", "PUBLISHED", "OUTSIDE", "INPUT-MODIFIED")
HASH_LIMIT = 64 << 20


@dataclass
class CaseResult:
    index: int
    mutator: str
    family: str
    command: str
    detail: str
    argv: list[str]
    outcome: str = "ok"
    rc: int | None = None
    wall: float = 0.0
    effects: dict[str, list[str]] = field(default_factory=dict)
    cause: str = ""  # INTERNAL/HANG: exception type and innermost loratool frame
    message: str = ""  # the exception, the error line, or why it was skipped
    stderr: str = ""
    stdout: str = ""
    seed: int = 0
    trace: str = ""  # INTERNAL: the traceback; HANG: the stacks faulthandler dumped

    @property
    def classes(self) -> list[str]:
        return [self.outcome, *self.effects]

    @property
    def reproducer(self) -> str:
        """Rebuilds this case (whatever the schedule becomes) in DIR/root and runs it."""
        return (f"python -m tests.fuzz --seed {self.seed} --case {self.index} --mutator {self.mutator} "
                f"--command {self.command} --keep DIR")

    def failing(self) -> list[str]:
        return [c for c in self.classes if c in ASSERTED]


# -- the schedule ---------------------------------------------------------------------------------


def schedule(seed: int, runs: int, mutators: list[Mutator] | None = None) -> Iterator[tuple[int, Mutator, str]]:
    """(index, mutator, command) for runs 0..runs-1: every mutator in a seeded order, round and
    round, each visit taking the next of its commands (from a seeded offset)."""
    order = list(mutators or all_mutators())
    Random(f"schedule/{seed}").shuffle(order)
    offsets = {m.name: Random(f"offset/{seed}/{m.name}").randrange(len(m.commands)) for m in order}
    for i in range(runs):
        m = order[i % len(order)]
        visit = i // len(order)
        yield i, m, m.commands[(offsets[m.name] + visit) % len(m.commands)]


def case_at(seed: int, index: int, mutator: str | None = None, command: str | None = None) -> tuple[Mutator, str]:
    """The mutator and command of case ``index``: the schedule's, unless named (a corpus entry)."""
    if mutator is not None:
        by_name = {m.name: m for m in all_mutators()}
        if mutator not in by_name:
            raise KeyError(f"no mutation class {mutator!r}")
        m = by_name[mutator]
        if command is None or command not in m.commands:
            raise KeyError(f"{mutator} runs one of {m.commands}, not {command!r}")
        return m, command
    for i, m, cmd in schedule(seed, index + 1):
        if i == index:
            return m, cmd
    raise IndexError(index)


def build_case(fixtures: Fixtures, seed: int, index: int, mutator: Mutator, command: str, root: Path) -> tuple[Workspace, str]:
    token = f"LTFUZZSECRET{Random(f'token/{seed}/{index}').getrandbits(64):016x}".encode()
    ws = Workspace(root, fixtures, token)
    ws.create()
    detail = mutator.build(ws, command, Random(f"case/{seed}/{index}/{mutator.name}/{command}"))
    return ws, detail


# -- what changed ---------------------------------------------------------------------------------


def _entry(p: Path) -> tuple | None:
    try:
        st = os.lstat(p)
    except OSError:  # missing, a file where a folder was, or a name too long to exist
        return None
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(p))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", st.st_ino, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    if stat.S_ISREG(st.st_mode):
        digest = None
        if st.st_size <= HASH_LIMIT:
            h = hashlib.sha256()
            try:
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                digest = h.hexdigest()
            except OSError as e:  # gone between lstat and open
                digest = f"unreadable: {e.strerror}"
        return ("file", st.st_ino, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return ("special", st.st_ino, st.st_mode, st.st_rdev, st.st_mtime_ns)


def snapshot(top: Path) -> dict[str, tuple]:
    """Every entry under ``top`` (links not followed), keyed by its path relative to ``top``."""
    out: dict[str, tuple] = {}

    def visit(p: Path, rel: str) -> None:
        e = _entry(p)
        if e is None:
            return
        out[rel] = e
        if e[0] == "dir":
            try:
                names = sorted(os.listdir(p))
            except OSError:
                return
            for name in names:
                visit(p / name, f"{rel}/{name}" if rel else name)

    visit(top, "")
    return out


def _under(rel: str, prefix: str) -> bool:
    return rel == prefix or rel.startswith(prefix + "/")


def _change(before: tuple | None, after: tuple | None) -> str:
    if before is None:
        return "created"
    if after is None:
        return "removed"
    if before[0] == after[0] == "dir" and before[1:3] == after[1:3]:
        return "entries added or removed"
    if before[0] == after[0] == "file" and before[5] == after[5] and before[1:4] == after[1:4]:
        return "mtime changed"
    return "replaced" if before[0] != after[0] or before[1:2] != after[1:2] else "modified"


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError:
        return b""


def _identity(p: Path | None, in_out: bool) -> tuple | None:
    """What PUBLISHED compares: existence, type, inode, link target, a file's bytes, and (for a
    folder inside OUT) its listing."""
    if p is None:
        return None
    e = _entry(p)
    if e is None:
        return None
    if e[0] == "dir":
        try:
            listing = tuple(sorted(os.listdir(p))) if in_out else ()
        except OSError:
            listing = ("unreadable",)
        return ("dir", e[1], listing)
    if e[0] == "file":
        return ("file", e[1], e[5])
    return e[:2]


def _rel(ws: Workspace, p: Path) -> str:
    try:
        return str(p.relative_to(ws.root)) or "."
    except ValueError:
        return str(p)


def side_effects(ws: Workspace, before: dict, after: dict, rc: int | None, out_before: tuple,
                 out_after: tuple) -> dict[str, list[str]]:
    effects: dict[str, list[str]] = defaultdict(list)
    inputs = [_rel(ws, p) for p in ws.inputs()]
    protected = [_rel(ws, p) for p in ws.protected] + ["out/victim"]
    out_rel = _rel(ws, ws.out) if ws.out is not None else None
    out_parent = _rel(ws, ws.out.parent) if ws.out is not None else None
    if out_parent == ".":
        out_parent = ""
    home = "scratch/home"
    for rel in sorted(set(before) | set(after)):
        b, a = before.get(rel), after.get(rel)
        if b == a:
            continue
        change = _change(b, a)
        where = rel or "ROOT"
        if change == "entries added or removed" and rel == out_parent and not any(_under(rel, p) for p in inputs):
            continue  # a temporary output beside the destination, created and removed again
        if _under(rel, "scratch"):
            if ws.protect_home and _under(rel, home) and b is not None and b[0] != "dir" \
                    and not _under(rel, home + "/hashes"):
                effects["OUTSIDE"].append(f"{where} {change} ($LORATOOL_HOME)")
            continue
        if any(_under(rel, p) for p in inputs):
            effects["INPUT-MODIFIED"].append(f"{where} {change}")
            continue
        if _under(rel, "out") and not any(_under(rel, p) for p in protected):
            if rel == "out":
                continue
            first = rel.split("/")[1]
            output_names = set()
            if out_rel and _under(out_rel, "out") and out_rel != "out":
                name = out_rel.split("/")[1]
                output_names = {name, name + ".loratool.json"}
            if first not in output_names and b is None and "/" not in rel[4:]:
                effects["STRAY"].append(f"{where} left in OUT")
            continue
        effects["OUTSIDE"].append(f"{where} {change}")
    # rc None: a hang that the harness killed (counted HANG): what it left is not its choice
    if rc is not None and rc != 0 and out_before != out_after:
        o_b, o_a = out_before[0], out_after[0]
        what = ("created" if o_b is None else "removed" if o_a is None else "replaced or changed") if o_b != o_a \
            else "sidecar .loratool.json written"
        effects["PUBLISHED"].append(f"-o {out_rel} {what} by a run that failed")
    return dict(effects)


def leaks(ws: Workspace, before: dict, after: dict, stdout: str, stderr: str) -> list[str]:
    """What a command took from outside its inputs' folders: new symlinks in OUT (or in the -o
    path wherever it is), and the token of the files outside (the secret, the victims) in a new
    file there, in $LORATOOL_HOME's store, or in what it printed."""
    found = []
    tops = ["out", "scratch/home"]
    if ws.out is not None and _rel(ws, ws.out) != str(ws.out) and not _under(_rel(ws, ws.out), "out"):
        tops.append(_rel(ws, ws.out))
    for rel, e in after.items():
        if not any(_under(rel, t) for t in tops) or before.get(rel) == e or _under(rel, "scratch/home/hashes"):
            continue
        if e[0] == "link" and not _under(rel, "scratch"):
            found.append(f"leak: {rel} is a symlink to {e[1]}")
        elif e[0] == "file" and e[3] <= HASH_LIMIT and ws.token in _read(ws.root / rel):
            found.append(f"leak: {rel} holds the secret's bytes")
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if ws.token.decode() in text:
            found.append(f"leak: {name} shows the content of a file outside the inputs")
    return found


# -- what the command said ------------------------------------------------------------------------

_TB_FILE = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def _loratool_frame(frames: list) -> tuple[str, int, str] | None:
    for filename, line, func in reversed(frames):
        norm = filename.replace(os.sep, "/")
        if "/loratool/" in norm and "/tests/" not in norm:
            return "loratool/" + norm.rsplit("/loratool/", 1)[1], line, func
    return None


def _hang_cause(text: str) -> str:
    """The innermost loratool frame of the main thread (the one running cli.main), from faulthandler."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    best = None
    for block in blocks:
        frames = _TB_FILE.findall(block)  # most recent call first
        lt = [(f, int(n), fn) for f, n, fn in frames if "/loratool/" in f and "/tests/" not in f]
        if not lt:
            continue
        f, n, fn = lt[0]
        where = f"loratool/{f.rsplit('/loratool/', 1)[1]}:{fn}:{n}"
        if any("cli/__init__.py" in fr[0] for fr in lt) or best is None:
            best = where
            if any("cli/__init__.py" in fr[0] for fr in lt):
                break
    return best or "no loratool frame (see hang.txt)"


def classify(command: str, reply: dict, stdout: str, stderr: str, hang_text: str) -> tuple[str, str, str]:
    """(outcome, cause, message) of one run."""
    status = reply.get("status")
    result = reply.get("result") or {}
    if status == "timeout":
        return "HANG", "HANG at " + _hang_cause(hang_text), f"no exit after {TIMEOUT:.0f} s"
    if status == "signaled":
        return "INTERNAL", f"killed by signal {reply.get('code')}", ""
    if "rc" not in result or result.get("rc") is None:
        return "INTERNAL", f"child exited {reply.get('code')} without a result", stderr[-300:]
    rc = result["rc"]
    text = stdout + stderr
    if "exception" in result:
        frame = _loratool_frame(result.get("frames") or [])
        where = f"{frame[0]}:{frame[2]}:{frame[1]}" if frame else "outside loratool"
        return "INTERNAL", f"{result['exception']} at {where}", result.get("message", "")
    if "flush_error" in result:
        return "INTERNAL", f"{result['flush_error'].split(':')[0]} writing the output stream", result["flush_error"]
    if rc == 70 or "Traceback (most recent call last)" in text:
        m = re.search(r"internal error: (\w+)", stderr)
        return "INTERNAL", f"{m.group(1) if m else 'traceback'} (exit {rc})", stderr.strip()[-300:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    # warnings, and the plain progress lines of loratool.cli.progress (stderr is not a terminal here)
    errors = [ln for ln in lines if not ln.startswith("loratool: warning:") and not PROGRESS_LINE.match(ln)]
    if rc == 0:
        if command == "inspect_json":
            try:
                json.loads(stdout)
            except ValueError:
                return "UNCLEAN", "inspect --json printed no JSON", stdout[:200]
        if errors:
            return "UNCLEAN", "exit 0 with stderr lines that are not warnings", errors[0][:200]
        return "ok", "", ""
    if rc in (1, 2, 3) and len(errors) == 1 and errors[0].startswith("loratool: error: "):
        return "refused", "", errors[0][:300]
    if command.startswith("validate") and rc == 1 and not errors and stdout.strip():
        return "refused", "", "validate: " + stdout.strip().splitlines()[-1][:300]
    return "UNCLEAN", f"exit {rc} with {len(errors)} non-warning stderr lines", (errors[:1] or [""])[0][:300]


# -- the run --------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "LORATOOL_DEBUG": "1",
    }


def _unblock_fifos(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            try:
                if stat.S_ISFIFO(os.lstat(p).st_mode):
                    os.close(os.open(p, os.O_RDWR | os.O_NONBLOCK))
            except OSError:
                pass


@dataclass
class Report:
    seed: int
    runs: int
    seconds: float = 0.0
    results: list[CaseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> Counter:
        c: Counter = Counter()
        for r in self.results:
            c.update(r.classes)
        return c

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.failing()]

    def causes(self) -> dict[str, list[CaseResult]]:
        """Failing runs grouped: INTERNAL/HANG by exception type and innermost loratool frame; the
        side effects by class, mutation class and what changed."""
        groups: dict[str, list[CaseResult]] = defaultdict(list)
        for r in self.results:
            if r.outcome in ("INTERNAL", "HANG"):
                groups[f"{r.outcome}: {r.cause}"].append(r)
            for cls in ("PUBLISHED", "OUTSIDE", "INPUT-MODIFIED"):
                if cls in r.effects:
                    groups[f"{cls}: {r.mutator} ({effect_kind(r.effects[cls][0])})"].append(r)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def summary(self) -> str:
        c = self.counts()
        return "\n".join([
            f"loratool fuzz: seed {self.seed}, {len(self.results)} runs in {self.seconds:.1f} s",
            "outcomes:     " + ", ".join(f"{k} {c.get(k, 0)}" for k in OUTCOMES),
            "side effects: " + ", ".join(f"{k} {c.get(k, 0)}" for k in EFFECTS),
            *self.notes,
        ])

    def tables(self) -> str:
        cols = ["runs", *OUTCOMES, *EFFECTS]
        lines = []
        for title, key, order in (("mutation class", "mutator", None), ("command", "command", list(COMMANDS))):
            per: dict[str, Counter] = defaultdict(Counter)
            for r in self.results:
                per[getattr(r, key)]["runs"] += 1
                per[getattr(r, key)].update(r.classes)
            lines.append("")
            lines.append(f"{title:32}" + "".join(f"{k[:9]:>10}" for k in cols))
            for name in order or sorted(per):
                lines.append(f"{name:32}" + "".join(f"{per[name].get(k, 0):>10}" for k in cols))
        return "\n".join(lines)

    def failure_text(self) -> str:
        """The distinct failure causes, each with its first run and a reproducer."""
        groups = self.causes()
        lines = [f"distinct failure causes: {len(groups)}"]
        for key, rs in groups.items():
            r = rs[0]
            muts = Counter(x.mutator for x in rs)
            lines.append(f"* {key} - {len(rs)} runs ({', '.join(f'{m} x{n}' for m, n in muts.most_common(4))})")
            lines.append(f"    e.g. case {r.index} [{r.command}]: {r.detail}")
            lines.append(f"    $ loratool {' '.join(quote_arg(a) for a in r.argv)}  -> exit {r.rc}")
            if r.message:
                lines.append(f"    {r.message[:300]}")
            for cls in ("PUBLISHED", "OUTSIDE", "INPUT-MODIFIED"):
                if cls in r.effects:
                    lines.append(f"    {cls}: {'; '.join(r.effects[cls][:3])}")
            lines.append(f"    reproduce: {r.reproducer}")
        return "\n".join(lines)

    def other_text(self) -> str:
        """UNCLEAN exits (not asserted) and SKIPPED runs."""
        lines = []
        unclean: dict[str, list[CaseResult]] = defaultdict(list)
        for r in self.results:
            if r.outcome == "UNCLEAN":
                unclean[f"{r.cause}: {r.message[:100]}"].append(r)
        if unclean:
            lines.append(f"UNCLEAN (not asserted): {len(unclean)} kinds")
            for key, rs in sorted(unclean.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"* {key} - {len(rs)} runs, e.g. case {rs[0].index} {rs[0].mutator} [{rs[0].command}]")
        skipped = [r for r in self.results if r.outcome == "SKIPPED"]
        if skipped:
            lines.append(f"SKIPPED: {len(skipped)} runs ({skipped[0].message})")
        return "\n".join(lines)

    def text(self) -> str:
        return "\n\n".join(t for t in (self.summary(), self.tables(), self.failure_text(), self.other_text()) if t)

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "runs": self.runs, "seconds": self.seconds,
                           "counts": dict(self.counts()), "notes": self.notes,
                           "results": [asdict(r) for r in self.results]}, indent=1)


def effect_kind(text: str) -> str:
    """A side effect without its paths, to group runs by: 'victim: modified', 'secret printed on stdout'."""
    if text.startswith("leak:"):
        if " stdout " in text or " stderr " in text:
            return "the secret printed on " + text.split()[1]
        if "is a symlink" in text:
            return "a symlink in the output"
        return "the secret copied into " + ("$LORATOOL_HOME" if "scratch/home" in text else "the output")
    if text.startswith("created beside ROOT"):
        return "created beside ROOT"
    if text.startswith("-o "):
        return text.split(" ", 2)[2]
    where, _, change = text.partition(" ")
    return f"{where.split('/')[0]}: {change}"


def quote_arg(a: str) -> str:
    return a if re.fullmatch(r"[\w@%+=:,./$-]+", a) else "'" + a.replace("'", "'\\''") + "'"


def run_case(runner: Runner, fixtures: Fixtures, seed: int, index: int, mutator: Mutator, command: str,
             root: Path, logs: Path, timeout: float = TIMEOUT, build_only: bool = False,
             entry: str = "loratool.cli:main") -> CaseResult:
    """Build case ``index`` in ``root``, run it, classify it. ``root``'s parent must hold nothing
    else this run may create (anything new there is OUTSIDE). ``entry`` replaces the CLI in the
    harness's own tests."""
    ws, detail = build_case(fixtures, seed, index, mutator, command, root)
    argv = ws.argv(command)
    res = CaseResult(index, mutator.name, mutator.family, command, detail,
                     [a.replace(str(root), "$ROOT") for a in argv], seed=seed)
    if build_only:
        return res
    if ws.skip:
        res.outcome, res.message = "SKIPPED", ws.skip
        return res
    logs.mkdir(parents=True, exist_ok=True)
    env = ws.env(base_env())
    for setup in ws.setup:
        reply = runner.run(setup, env, root / "cwd", logs, timeout)
        if (reply.get("result") or {}).get("rc") != 0:
            res.outcome = "SKIPPED"
            res.message = f"setup `loratool {' '.join(setup[:1])}` failed: {(logs / 'stderr').read_text()[-300:]}"
            return res
    for damage in ws.after_setup:
        res.detail += " " + damage()
    siblings = set(os.listdir(root.parent))
    before = snapshot(root)
    in_out = ws.out is not None and _under(_rel(ws, ws.out), "out")
    sidecar = Path(str(ws.out) + ".loratool.json") if ws.out is not None else None
    out_before = (_identity(ws.out, in_out), _identity(sidecar, True))
    reply = runner.run(argv, env, root / "cwd", logs, timeout, entry)
    if reply["status"] == "timeout":
        _unblock_fifos(root)

    def read(name: str) -> str:
        p = logs / name
        return p.read_text(errors="replace") if p.exists() else ""

    stdout, stderr = read("stdout"), read("stderr")
    res.rc = (reply.get("result") or {}).get("rc")
    res.wall = reply.get("wall", 0.0)
    res.outcome, res.cause, res.message = classify(command, reply, stdout, stderr, read("hang.txt"))
    res.stdout, res.stderr = stdout[-2000:], stderr[-2000:]
    if res.outcome == "INTERNAL":
        res.trace = ((reply.get("result") or {}).get("traceback") or "")[-4000:]
    elif res.outcome == "HANG":
        res.trace = read("hang.txt")[-4000:]
    after = snapshot(root) if root.exists() else {}
    out_after = (_identity(ws.out, in_out), _identity(sidecar, True))
    res.effects = side_effects(ws, before, after, res.rc if res.outcome != "HANG" else None, out_before, out_after)
    leaked = leaks(ws, before, after, stdout, stderr)
    if leaked:
        res.effects.setdefault("OUTSIDE", []).extend(leaked)
    new_siblings = set(os.listdir(root.parent)) - siblings
    if new_siblings:
        res.effects.setdefault("OUTSIDE", []).append(f"created beside ROOT: {sorted(new_siblings)}")
        for name in new_siblings:
            p = root.parent / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return res


def run_fuzz(fixtures_dir: Path, runs: int, seed: int, workdir: Path | None = None,
             only: list[int] | None = None, keep: Path | None = None, build_only: bool = False,
             progress: Callable[[CaseResult], None] | None = None, timeout: float = TIMEOUT,
             workers: int = 2, extra: Iterable[tuple[int, int, str, str]] = (),
             mutator: str | None = None, command: str | None = None) -> Report:
    """Run ``runs`` cases of ``seed``'s schedule (or only the indexes in ``only``, as
    ``mutator``/``command`` when named), then the ``extra`` (seed, index, mutator, command) cases
    (the corpus), on ``workers`` fork servers. Results come in that order whatever the workers'
    timing. With ``keep`` the single case is built in KEEP/root and left there."""
    fixtures_dir = Path(fixtures_dir)
    fixtures = Fixtures(fixtures_dir)
    session = Path(keep or workdir or tempfile.mkdtemp(prefix="loratool-fuzz-"))
    session.mkdir(parents=True, exist_ok=True)
    report = Report(seed, runs)
    todo = [(seed, i, *case_at(seed, i, mutator, command)) for i in only] if only is not None \
        else [(seed, i, m, c) for i, m, c in schedule(seed, runs)]
    todo += [(s, i, *case_at(s, i, m, c)) for s, i, m, c in extra]
    order = {(s, i, m.name, c): n for n, (s, i, m, c) in enumerate(todo)}
    workers = max(1, min(workers, len(todo)))
    lock = threading.Lock()
    errors: list[BaseException] = []
    t0 = time.monotonic()
    trash: queue.Queue[Path | None] = queue.Queue()  # deleting is slow on some disks: not in line

    def empty_trash() -> None:
        while (p := trash.get()) is not None:
            shutil.rmtree(p, ignore_errors=True)

    deleter = threading.Thread(target=empty_trash, daemon=True)
    deleter.start()

    def work(w: int) -> None:
        cases_dir, server_dir = session / f"cases{w}", session / f"server{w}"
        cases_dir.mkdir(exist_ok=True)
        server_dir.mkdir(exist_ok=True)
        senv = dict(base_env(), HOME=str(server_dir), LORATOOL_HOME=str(server_dir), TMPDIR=str(server_dir),
                    PYTHONPATH=str(REPO))
        senv.pop("LORATOOL_DEBUG")
        runner = Runner(REPO, senv)
        try:
            if not build_only:
                runner.start()
                if w == 0:
                    report.notes.extend(f"note: warm-up import failed: {m}" for m in runner.missing)
            for case_seed, index, mut, cmd in todo[w::workers]:
                if errors:
                    return
                # a kept case lives in KEEP/root: its parent must be a folder nothing else writes to
                root = Path(keep) / "root" if keep is not None else cases_dir / f"case-{case_seed}-{index:05d}"
                if keep is not None:
                    shutil.rmtree(root, ignore_errors=True)
                    root.parent.mkdir(parents=True, exist_ok=True)
                logs = session / "logs" / f"case-{case_seed}-{index:05d}"
                if keep is not None:
                    shutil.rmtree(logs, ignore_errors=True)
                res = run_case(runner, fixtures, case_seed, index, mut, cmd, root, logs, timeout, build_only)
                with lock:
                    report.results.append(res)
                    if progress:
                        progress(res)
                if keep is None:
                    if os.path.lexists(root):  # moved out of the next case's siblings at once
                        done = session / f"done-{w}-{case_seed}-{index:05d}"
                        root.rename(done)
                        trash.put(done)
                    if not res.failing():
                        trash.put(logs)
        except BaseException as e:  # noqa: BLE001 - a harness bug: stop every worker, re-raise below
            errors.append(e)
        finally:
            runner.close()

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        trash.put(None)
        deleter.join()
        report.results.sort(key=lambda r: order[(r.seed, r.index, r.mutator, r.command)])
        report.seconds = time.monotonic() - t0
        if workdir is None and keep is None:
            shutil.rmtree(session, ignore_errors=True)
    if errors:
        raise errors[0]
    return report
