"""The one boundary between loratool and the user's files: what may be read, what may be written.

loratool runs on adapters and bases from strangers. Every file such an input *names* (an index's
shard entries, a config, the tokenizer and other files copied along into an output) is resolved
here, inside the folder the input came from; every output is checked and published here. Other
modules open user paths only through these functions (``tests/test_boundary.py`` walks the
library and fails when one does not).

Input (``InputRoot``, ``open_regular``, ``read_json``, ``copy_regular``):
* An entry that is absolute, has a ``..`` part, or is a symbolic link whose target leaves the
  input's root is refused with one line naming it. The root of a folder in a Hugging Face cache
  snapshot is its repository folder (``models--owner--name``), whose ``blobs/`` its links point
  into.
* Only regular files are read: a FIFO, a device or a socket is refused at once (it is opened
  non-blocking, so a FIFO with no writer cannot hang the process).
* JSON reads are bounded: size, nesting depth, integer digits; strings must be valid Unicode (a
  lone surrogate cannot be written anywhere later). Every failure is one ``InputError`` line.

Output (``check_output``, ``atomic_path``, ``atomic_dir``):
* One function, ``check_output``, decides whether a destination may be written. Even with
  ``--overwrite`` it refuses a destination that is, contains or lies inside an input or
  ``$LORATOOL_HOME``; one that is a symbolic link (dangling or not: it is never followed or
  replaced); and one that is not a regular file or folder (a device, FIFO or socket).
* ``--overwrite`` replaces only what would be written: an existing folder is replaced only when
  every file in it is one the new output writes too, so nothing else in it is ever deleted.
* The temporary output is created beside the destination inside the same ``try`` that turns
  ``OSError`` into one line, read back by the caller's ``verify`` before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from loratool.errors import FormatError, InputError, OutputError, UnsafePathError, UsageError

MAX_JSON_BYTES = 64 * 1024 * 1024  # configs and indexes of the largest models are a few MB
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40  # beyond any size or count (2^128 has 39 digits); Python's own limit is 4300

_HF_REPO = re.compile(r"^(.*/models--[^/]+--[^/]+)/snapshots/[^/]+(/|$)")


def default_home(environ: dict[str, str] | None = None) -> Path:
    """``$LORATOOL_HOME``, else ``$XDG_CACHE_HOME/loratool``, else ``~/.cache/loratool``."""
    env = os.environ if environ is None else environ
    if env.get("LORATOOL_HOME"):
        return Path(env["LORATOOL_HOME"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "loratool"
    return Path("~/.cache/loratool").expanduser()


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


# -- input ----------------------------------------------------------------------------------------

# Every input this process has opened (real paths): no output may be, contain or lie inside one.
# Recording them where inputs are opened (``InputRoot``) protects them from every writer without
# each command having to list its inputs again (registry refs and hf:// included: what is recorded
# is the materialized path).
_INPUTS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("loratool_inputs", default=())


def note_input(path: str | os.PathLike) -> None:
    """Protect ``path`` (a file or folder read as an input) from every later output."""
    real = _real(Path(path))
    if real not in _INPUTS.get():
        _INPUTS.set(_INPUTS.get() + (real,))


def noted_inputs() -> tuple[Path, ...]:
    return _INPUTS.get()


@contextlib.contextmanager
def fresh_inputs() -> Iterator[None]:
    """A scope with no recorded inputs (for a long-running program that reads and writes many
    unrelated things); the record is restored on leaving."""
    token = _INPUTS.set(())
    try:
        yield
    finally:
        _INPUTS.reset(token)


class InputRoot:
    """The folder an input came from; every file the input names is resolved inside it."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        self.root = p if p.is_dir() else p.parent
        note_input(p)
        real = _real(self.root)
        m = _HF_REPO.match(real.as_posix())
        self.limit = Path(m.group(1)) if m else real

    def entry(self, name: Any, where: str | os.PathLike, folder: Path | None = None) -> Path:
        """``folder/name`` (``folder`` defaults to the root) for a relative file name that an index
        or config lists, checked."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise UnsafePathError(f"{where}: lists a file name {name!r} that is not a relative path")
        pure = PurePosixPath(name)
        if pure.is_absolute() or "\\" in name or re.match(r"^[A-Za-z]:", name):
            raise UnsafePathError(f"{where}: lists {name!r}, an absolute path; files an input names must lie "
                                  f"in its own folder {self.root}")
        if ".." in pure.parts:
            raise UnsafePathError(f"{where}: lists {name!r}, which climbs out of {self.root} with '..'; "
                                  "refusing to follow it")
        return self.inside((self.root if folder is None else folder) / pure, where)

    def inside(self, p: Path, where: str | os.PathLike | None = None) -> Path:
        """``p`` itself, once its real path is known to stay inside the root."""
        real = _real(p)
        if not _within(real, self.limit):
            via = f"{where}: " if where is not None and Path(where) != p else ""
            raise UnsafePathError(f"{via}{p}: resolves to {real}, outside the input's folder {self.root} "
                                  "(a symbolic link that leaves it); refusing to read it")
        return p


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (a FIFO, device or socket
    is refused at once: the open does not block, and nothing is read from it)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{path}: a symbolic link that loops; cannot read it") from None
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise InputError(f"{path}: a broken symbolic link (its target {os.readlink(path)} is missing)") from None
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit // (1024 * 1024)} MiB; not a config or index file")
    return data


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _JsonLimit(f"an integer of {digits} digits (limit {MAX_INT_DIGITS})")
    return int(text)


class _JsonLimit(ValueError):
    pass


def _check_tree(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise _JsonLimit(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_tree(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_tree(v, depth + 1)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _JsonLimit(f"a string with a lone surrogate ({s[:40]!r})") from None


def parse_json(data: bytes | str, where: str | os.PathLike, what: str = "JSON") -> Any:
    """``data`` parsed with the bounds of ``read_json``; ``where`` names it in errors."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_int=_bounded_int)
        _check_tree(value)
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not valid UTF-8 at byte {e.start}; not a {what} file") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from None
    except _JsonLimit as e:
        raise FormatError(f"{where}: refusing {what} with {e}") from None
    except RecursionError:
        raise FormatError(f"{where}: refusing {what} nested too deeply") from None
    except ValueError as e:  # int-string limits and other parse-time value errors
        raise FormatError(f"{where}: not valid {what} ({e})") from None
    return value


def read_json(path: str | os.PathLike, what: str = "JSON", limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, read as ``read_bytes`` does and parsed within the bounds above."""
    return parse_json(read_bytes(path, limit), path, what)


def copy_regular(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the regular file ``src`` to the new file ``dest`` (never through a link at ``dest``;
    the copy is a regular file with the usual mode, whatever ``src`` was)."""
    fd = open_regular(src)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "rb", closefd=False) as r, os.fdopen(out, "wb", closefd=False) as w:
                shutil.copyfileobj(r, w, 8 * 1024 * 1024)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def regular_files(folder: Path) -> Iterator[Path]:
    """The regular files under ``folder`` (recursively, never through a link)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            p = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(p).st_mode):
                yield p


# -- output ---------------------------------------------------------------------------------------

def check_output(dest: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                 kind: str = "file", home: Path | None = None, sidecar: bool = False) -> Path:
    """Whether ``dest`` may be written (``kind``: "file" or "dir"); raise with one line if not.

    Refused even with ``overwrite``: a destination that is, contains or lies inside one of
    ``inputs``, an input this process has read (``note_input``) or the registry home; a symbolic
    link; anything but a regular file or folder. ``sidecar``: ``dest`` is a file written directly
    into an input folder on purpose (the manifest ``loratool.json`` beside an adapter's weights),
    which is allowed there and nowhere deeper.
    """
    dest = Path(os.path.abspath(dest))
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{dest}: cannot use as output: {e.strerror or e}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            state = "a dangling symbolic link" if not dest.exists() else f"a symbolic link to {os.path.realpath(dest)}"
            raise OutputError(f"{dest}: is {state}; loratool never writes through or replaces a link: remove it "
                              "or choose another output")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest.parent}: output folder does not exist")
    real = _real(dest.parent) / dest.name
    protected = [(default_home() if home is None else Path(home), "the registry home ($LORATOOL_HOME)")]
    protected += [(Path(p), "the input") for p in [*inputs, *noted_inputs()] if p is not None]
    for p, what in protected:
        rp = _real(p)
        if real == rp:
            relation = "is"
        elif sidecar and real.parent == rp and kind == "file" and what == "the input":
            continue
        elif rp in real.parents:
            relation = "lies inside"
        elif real in rp.parents:
            relation = "contains"
        else:
            continue
        raise UsageError(f"{dest}: the output {relation} {what} {p}; choose an output outside it "
                         "(inputs and the registry are never modified, even with --overwrite)")
    if st is not None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OutputError(f"{dest}: is {_kind(st.st_mode)}; refusing to replace it with an output")
        if not overwrite:
            raise OutputError(f"{dest}: already exists; choose another output or pass --overwrite")
        if kind == "file" and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{dest}: is a folder, and this output is one file; --overwrite never replaces a "
                              "folder with a file: choose another output")
        if kind == "dir" and not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{dest}: is a file, and this output is a folder; --overwrite never replaces a "
                              "file with a folder: choose another output")
    return dest


class _Interrupted(BaseException):
    """SIGTERM during a write: unwinds like KeyboardInterrupt, so temporary outputs are removed."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration (main thread only; elsewhere a no-op)."""
    def handler(signum, frame):  # pragma: no cover - exercised by subprocess tests
        raise _Interrupted()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename in it is durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; an output gets the usual mode under the umask."""
    try:
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    except OSError:
        pass


def _remove(p: Path | None) -> None:
    if p is None:
        return
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# Written beside every output once it is in place (the manifest, ``loratool.manifest``).
SIDECARS = frozenset({"loratool.json"})


def _others(dest: Path, new: Path) -> list[str]:
    """Files in the existing output ``dest`` that the new output ``new`` does not write."""
    theirs = {p.relative_to(new).as_posix() for p in regular_files(new)} | SIDECARS
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = (Path(dirpath) / name).relative_to(dest).as_posix()
            if rel not in theirs:
                found.append(rel)
    return sorted(found)


@contextlib.contextmanager
def _publishing(dest: Path) -> Iterator[dict]:
    """The failure handling both publishers share: SIGTERM unwinds like Ctrl-C, and on any failure
    the temporary output named by ``state["tmp"]`` is removed; OSError becomes one line."""
    state: dict[str, Path | None] = {"tmp": None}
    try:
        with _sigterm_raises():
            yield state
    except _Interrupted:
        _remove(state["tmp"])
        raise OutputError(f"{dest}: interrupted (SIGTERM); nothing was written") from None
    except OSError as e:
        _remove(state["tmp"])
        raise OutputError(f"{dest}: cannot write: {e.strerror or e}") from None
    except BaseException:
        _remove(state["tmp"])
        raise


def _fsync(path: Path) -> None:
    fd = open_regular(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (),
                verify: Callable[[Path], None] | None = None, sidecar: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``dest``; after ``verify(tmp)`` passes, it is renamed onto
    ``dest`` (checked by ``check_output`` first). On any failure nothing appears at ``dest``."""
    inputs = list(inputs)
    dest = check_output(dest, overwrite=overwrite, inputs=inputs, kind="file", sidecar=sidecar)
    with _publishing(dest) as state:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        state["tmp"] = tmp_path = Path(tmp)
        yield tmp_path
        _fsync(tmp_path)
        if verify is not None:
            verify(tmp_path)
        _publish_mode(tmp_path, directory=False)
        check_output(dest, overwrite=overwrite, inputs=inputs, kind="file", sidecar=sidecar)  # still so
        os.replace(tmp_path, dest)
        state["tmp"] = None
        fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (),
               verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; it becomes ``dest`` on success only.

    On any failure (exception, Ctrl-C, SIGTERM) the temporary directory is removed. A kill -9
    leaves only a hidden ``.NAME.*.tmp`` directory beside ``dest``, never a partial ``dest``. An
    existing ``dest`` (with ``overwrite``) is replaced only if the new output writes every file it
    holds; otherwise nothing is replaced and the error names the first file it would lose.
    """
    inputs = list(inputs)
    dest = check_output(dest, overwrite=overwrite, inputs=inputs, kind="dir")
    old: Path | None = None
    try:
        with _publishing(dest) as state:
            state["tmp"] = tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
            yield tmp
            for p in regular_files(tmp):
                _fsync(p)
            fsync_dir(tmp)
            if verify is not None:
                verify(tmp)
            _publish_mode(tmp, directory=True)
            check_output(dest, overwrite=overwrite, inputs=inputs, kind="dir")
            if os.path.lexists(dest):
                others = _others(dest, tmp)
                if others:
                    more = f" and {len(others) - 1} more" if len(others) > 1 else ""
                    raise OutputError(f"{dest}: holds {others[0]}{more}, which this output does not write; "
                                      "--overwrite replaces only what loratool writes: move it away or choose "
                                      "another output")
                # a directory cannot be renamed over a non-empty one: move the old output aside,
                # put the new one in place, and put the old one back if that fails
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
                os.replace(dest, old / "x")
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    os.replace(old / "x", dest)
                    raise
            else:
                os.replace(tmp, dest)
            state["tmp"] = None
            fsync_dir(dest.parent)
    finally:
        _remove(old)
