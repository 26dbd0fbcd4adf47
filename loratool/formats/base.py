"""What every adapter format shares: the ``Format`` record a format module describes itself with
(``loratool.formats`` lists them, in one place), the ``ReadProblem`` a reader reports, and the
``FormatConfig`` base of each format's typed config.

It imports nothing of loratool at import time, so that ``loratool.adapter`` can name these types
and every format module can build them (``pair_problem`` asks ``kinds.lora`` when called).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection

# validate's check ids (loratool.validation.CHECKS) for what readers find
RANK_MISMATCH = "LT101"  # lora_A and lora_B disagree on the rank
MISSING_FACTOR = "LT102"  # a module has only one of its two factors
BAD_FACTOR = "LT106"  # factors that fit no layer (dimensions, rank 0, dtype), a tensor that is no factor
BAD_ALPHA = "LT206"  # an alpha that is not one positive finite number


@dataclass(frozen=True)
class ReadProblem:
    """A structural problem a reader found in one module or tensor: validate reports it under
    ``check``; every other command refuses the adapter with ``message``. (A module's own problems,
    found once it is built, are ``loratool.kinds.Problem``.)"""

    check: str  # a validate check id: RANK_MISMATCH, MISSING_FACTOR, BAD_FACTOR or BAD_ALPHA
    message: str  # one line naming the file and the module or tensor
    module: str | None = None  # the module as the file names it, when the problem is one module's

    def __str__(self) -> str:
        return self.message


def factor_check(why: str) -> str:
    """The check id of what ``factor_problem`` answered (LT101 for a rank mismatch, else LT106)."""
    return RANK_MISMATCH if why.startswith("A/B rank mismatch") else BAD_FACTOR


def pair_problem(a: Any, b: Any, label: str, module: str, names: tuple[str, str], found: str,
                 embedding: bool = False, missing: tuple[str, str] | None = None) -> ReadProblem | None:
    """What keeps a module's two factors from being read, or None: one of them missing (``a`` or
    ``b`` None; ``missing``, default ``names``, says how the format calls them, ``found`` what it
    found instead), or ``kinds.lora.factor_problem`` of the pair (``names`` in its message). Every
    reader of a LoRA pair asks this, so the problems read the same in every format."""
    if a is None or b is None:
        which = (missing or names)[0 if a is None else 1]
        return ReadProblem(MISSING_FACTOR, f"{label}: {which} is missing (only {found})", module)
    from loratool.kinds.lora import factor_problem

    why = factor_problem(a, b, names, embedding)
    return ReadProblem(factor_check(why), f"{label}: {why}", module) if why else None


class FormatConfig:
    """A format's own configuration, typed by the format: what its reader found beside the
    tensors and its writer keeps. Modules outside ``loratool.formats`` read a subclass's typed
    fields, never raw keys."""

    def document(self, ignored: Collection[str] = ()) -> dict[str, Any]:
        """The config as JSON, for ``fingerprint.config_digest``: the same document the config was
        read as (stored digests depend on it), without ``ignored`` fields (a tool's version)."""
        raise NotImplementedError

    def __bool__(self) -> bool:  # an empty config is no config (no digest, nothing to check)
        return bool(self.document())


@dataclass(frozen=True)
class Format:
    """One adapter format: how it is recognised, read and written, and what other modules may ask
    of it. Each format module declares its own (``FORMAT``); ``loratool.formats.REGISTRY`` lists
    them."""

    name: str  # as on the command line (--format, --to) and in reports
    title: str  # as in messages ("PEFT")
    read: Callable[..., Any]  # (path) -> Adapter, lazily (headers only)
    write: Callable[..., Any]  # (adapter, out, overwrite=False) -> the path written, atomically
    sniff_keys: Callable[[list[str]], bool]  # whether a .safetensors key set looks like this format
    sniff_order: int  # formats whose keys could also match a later one's are tried first
    key_example: str  # what its keys look like, for the "unknown key layout" message
    writes_directory: bool  # ``write`` makes a directory at OUT
    writes_file: bool  # ``write`` makes one .safetensors file at OUT (a path ending in .safetensors)
    marker: str | None = None  # a file whose presence makes a directory this format
    component_dirs: bool = False  # a directory may hold one sub-directory (with ``marker``) per component
    # Why one weights file of this format cannot be read alone (its config lives beside it), or None.
    needs_marker: str | None = None
    # ``write`` for ``convert``, when converting carries more than writing (the source's metadata).
    write_converted: Callable[..., Any] | None = None
    # Whether a .safetensors file's keys with its metadata are this format, where the keys alone
    # cannot tell (diffusers' unprefixed lora_A/lora_B keys with ``lora_adapter_metadata``): tried
    # for every format before any ``sniff_keys``.
    sniff_metadata: Callable[[list[str], dict[str, str]], bool] | None = None
    # Raises a one-line UsageError when ``write`` cannot write this adapter (diffusers needs pipeline
    # components), before any work: compose then writes the common format instead.
    check_writable: Callable[[Any], None] | None = None
    peft_loadable: bool = False  # PEFT loads it into a transformers model as it is (forward parity)
    library_name: str | None = None  # the Hub's library_name for a model card of it
