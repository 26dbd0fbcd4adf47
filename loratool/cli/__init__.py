"""The `loratool` command: a thin Click layer over the library.

Command modules import only click at module level; the library (and torch) is imported inside
the command, so `loratool --help` stays fast. Errors are handled once, in ``main``: a
``LoratoolError`` prints one line and exits with its code; nothing prints a traceback unless
LORATOOL_DEBUG=1.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from loratool._version import __version__

# name -> "module:function"; loaded only when that command runs (or for --help listings).
COMMANDS = {
    "inspect": "loratool.cli.inspect:inspect_cmd",
    "validate": "loratool.cli.validate:validate_cmd",
    "convert": "loratool.cli.convert:convert_cmd",
    "resize": "loratool.cli.resize:resize_cmd",
    "compose": "loratool.cli.compose:compose_cmd",
    "merge": "loratool.cli.merge:merge_cmd",
    "parity": "loratool.cli.merge:parity_cmd",
    "unmerge": "loratool.cli.merge:unmerge_cmd",
    "fingerprint": "loratool.cli.fingerprint:fingerprint_cmd",
    "manifest": "loratool.cli.fingerprint:manifest_cmd",
    "extract": "loratool.cli.extract:extract_cmd",
    "registry": "loratool.cli.registry:registry_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx, name):
        return self._load(name)

    @staticmethod
    def _load(name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod_name, attr = target.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # command not built yet
                return None
            raise
        return getattr(mod, attr, None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
def cli():
    """Inspect, validate, convert, resize, compose and merge LoRA adapters.

    Exit codes: 0 success; 1 findings at error level or parity failure; 2 unreadable input or
    bad usage; 3 adapter and base do not match.
    """


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def main(argv=None) -> None:
    from loratool.errors import EXIT_INPUT, LoratoolError

    # numpy's BLAS on one thread: commands spread their own work over threads (loratool.merge.numpy_engine)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    for stream in (sys.stdout, sys.stderr):  # a name we print can never crash the print
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    args = sys.argv[1:] if argv is None else list(argv)
    bad = next((a for a in args if isinstance(a, str) and _not_utf8(a)), None)
    if bad is not None:  # os.fsdecode keeps undecodable bytes as lone surrogates
        shown = bad.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        click.echo(f"loratool: error: {shown}: holds bytes that are not UTF-8; loratool records paths in "
                   "JSON (manifests, reports, the registry), which must be UTF-8: rename it", err=True)
        sys.exit(EXIT_INPUT)
    try:
        rv = cli.main(args=args, prog_name="loratool", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_INPUT if e.exit_code in (1, 2) else e.exit_code)
    except click.exceptions.Abort:
        click.echo("loratool: aborted", err=True)
        sys.exit(130)
    except LoratoolError as e:
        click.echo(f"loratool: error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("loratool: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # a bug of ours: still one line, unless asked for the traceback
        if os.environ.get("LORATOOL_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        click.echo(f"loratool: internal error: {type(e).__name__}: {msg} "
                   "(set LORATOOL_DEBUG=1 for a traceback, and please report it)", err=True)
        sys.exit(70)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
