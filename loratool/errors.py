"""One error hierarchy for loratool.

Every error that a user can cause carries a message that names the file (or tensor, or module),
what was found, what was expected and, where there is one, the fix. The CLI catches
``LoratoolError`` once, prints ``loratool: error: <message>`` on one line and exits with
``exit_code``; it never prints a traceback for these.

Exit codes (stable, documented in README.md):
  0  success
  1  findings at error level (validate), parity failure, an adapter that does not fit the base
     (module shapes or names: MisfitError)
  2  unreadable input or bad usage
  3  base mismatch (manifest/fingerprint does not match the base given)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_INPUT = 2
EXIT_BASE_MISMATCH = 3


class LoratoolError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class InputError(LoratoolError):
    """An input cannot be read: missing, truncated, corrupt, of an unknown or unsafe format."""


class FormatError(InputError):
    """The file is readable but its content does not follow the format it claims."""


class UnsafePathError(InputError):
    """A file an input names lies outside the input's folder (``..``, an absolute path, a link
    that leaves it), or is not a regular file: refused, never followed."""


class UnsafeFormatError(InputError):
    """A pickle-based checkpoint: refused, never unpickled."""


class UsageError(LoratoolError):
    """Bad arguments or options."""


class BaseMismatchError(LoratoolError):
    exit_code = EXIT_BASE_MISMATCH


class MisfitError(LoratoolError):
    """The adapter's modules do not fit the base (a missing target, other shapes): a finding about
    the pair, exit 1 with the shapes, as ``validate --base`` reports it; no override applies."""

    exit_code = EXIT_FINDINGS


class OutputError(LoratoolError):
    """An output cannot be written (exists, no space, permission)."""


# -- the registry (``loratool.registry``; importable from its modules too) ----------------------

class NotInRegistryError(InputError):
    """A well-formed reference that matches nothing in the registry."""


class AmbiguousRefError(UsageError):
    """A reference that matches more than one adapter; the message lists them."""


class CorruptBlobError(InputError):
    """A registry blob's bytes no longer hash to its name (or it is missing)."""


class IndexLockedError(InputError):
    """Another process holds the registry index's lock longer than we wait (exit 2)."""
