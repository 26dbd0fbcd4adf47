"""The compose-method registry: a method is a ``ComposeMethod`` subclass, registered under its
name and the PEFT combination types it computes (issues 12 and 14).

A method declares what ``compose_adapters`` needs to know before any tensor is read (which rank
rules it takes, whether it takes ``--density``, whether it works on the factors or on dense d×k
deltas, whether ``--seed`` matters) and does the math of one module (``compose``). Everything
around it (input checks, factor layouts, lora_B.bias, the report) is ``loratool.compose``'s. The
CLI's ``--method`` choices and help are read from here; no torch at import (``loratool --help``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

from loratool.errors import UsageError
from loratool.lowrank import RankRule

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch

RULE_KINDS = ("rank", "energy", "sv_ratio", "sv_cumulative", "sv_fro")  # the fields of RankRule, one set per rule


@dataclass(frozen=True)
class Factors:
    """One input's share of a module: ``weight · scale · B2 @ A2`` (B2 out×r, A2 r×in·kh·kw), numpy
    arrays of the factors' exact values (``AdapterModule.low_rank``: no torch), or torch tensors
    for a method whose ``arrays`` is "torch"."""

    weight: float
    scale: float
    B2: "numpy.ndarray"
    A2: "numpy.ndarray"

    def as_torch(self) -> "Factors":
        """The same factors as torch tensors (of the same values and dtype)."""
        import torch

        def t(x):
            return x if isinstance(x, torch.Tensor) else torch.from_numpy(x.copy())

        return Factors(self.weight, self.scale, t(self.B2), t(self.A2))


@dataclass(frozen=True)
class ComposeOptions:
    """What the user chose besides the method; ``rule`` is already checked (``ComposeMethod.check``)."""

    rule: RankRule | None
    density: float | None = None
    seed: int = 0
    majority_sign_method: str = "total"


@dataclass(frozen=True)
class Composed:
    """One composed module: ΔW = B2 @ A2 at scale 1 (rank = A2.shape[0]; numpy arrays, or torch
    tensors from a method that computes in torch) and how close it is to what the method combined
    (``energy_kept`` None where the method does not know it)."""

    B2: "numpy.ndarray | torch.Tensor"
    A2: "numpy.ndarray | torch.Tensor"
    relative_error: float
    energy_kept: float | None = None

    @property
    def rank(self) -> int:
        return self.A2.shape[0]


def module_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one module (blake2b, not Python's salted hash), so seeded methods
    do not depend on module order."""
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _rule_kind(rule: RankRule) -> str:
    return next(k for k in RULE_KINDS if getattr(rule, k) is not None)


def _and(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


class ComposeMethod:
    """A compose method. Subclasses set the class attributes and ``compose``, then ``@register``."""

    name: ClassVar[str]
    peft_aliases: ClassVar[tuple[str, ...]] = ()  # PEFT combination_type values that compute the same
    summary: ClassVar[str]  # one clause for --help
    rank_rules: ClassVar[tuple[str, ...]] = RULE_KINDS  # RankRule kinds it takes; () = none (exact)
    rule_note: ClassVar[str] = ""  # why it takes no rule / only these rules (its refusal says so)
    takes_density: ClassVar[bool] = False  # needs --density in (0, 1]
    dense: ClassVar[bool] = False  # works on dense d×k deltas: one module at a time, torch threaded
    seeded: ClassVar[bool] = False  # the output depends on --seed (the report records it)
    # The arrays ``compose`` gets its factors as: "numpy" (no torch import: linear, cat) or "torch"
    # (the default, for methods written on torch tensors: the factors' values, converted).
    arrays: ClassVar[str] = "torch"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("compose")
        if own is not None and cls.arrays == "torch":
            def compose(self, name, factors, options, _own=own):
                return _own(self, name, [f.as_torch() for f in factors], options)

            compose.__doc__, compose.__wrapped__ = own.__doc__, own
            cls.compose = compose

    def check(self, rule: RankRule | None, density: float | None, default_rank: int) -> RankRule | None:
        """The rule this method will use (``--rank default_rank`` when none is given), or a
        ``UsageError`` for an option it does not take."""
        if not self.rank_rules:
            if rule is not None:
                raise UsageError(f"--method {self.name} {self.rule_note}; rank rules apply to the other methods")
        else:
            rule = rule or RankRule(rank=default_rank)
            if _rule_kind(rule) not in self.rank_rules:
                only = " or ".join("--" + k.replace("_", "-") for k in self.rank_rules)
                raise UsageError(f"--method {self.name} takes {only} only: {self.rule_note}")
        if not self.takes_density and density is not None:
            raise UsageError(f"--density applies to {_and([m.name for m in methods() if m.takes_density])}, "
                             f"not {self.name}")
        if self.takes_density:
            if density is None:
                raise UsageError(f"--method {self.name} needs --density (the share of entries each delta keeps, "
                                 "in (0, 1])")
            if not 0 < density <= 1:
                raise UsageError(f"--density must be in (0, 1], found {density}")
        return rule

    def compose(self, name: str, factors: Sequence[Factors], options: ComposeOptions) -> Composed:
        """Combine one module's inputs (those that target it, in input order)."""
        raise NotImplementedError

    @property
    def peft_name(self) -> str | None:
        """The PEFT combination_type this method equals, if any."""
        return self.peft_aliases[0] if self.peft_aliases else None


_REGISTRY: dict[str, ComposeMethod] = {}  # canonical name -> method, in registration order
_ALIASES: dict[str, str] = {}  # PEFT name -> canonical name


def register(cls: type[ComposeMethod]) -> type[ComposeMethod]:
    """Register a method class (a decorator). Names and aliases are unique across the registry."""
    clash = sorted({cls.name, *cls.peft_aliases} & (set(_REGISTRY) | set(_ALIASES)))
    if clash:
        raise ValueError(f"compose method {cls.name!r}: {', '.join(clash)} already registered")
    _REGISTRY[cls.name] = cls()
    for alias in cls.peft_aliases:
        _ALIASES[alias] = cls.name
    return cls


def unregister(name: str) -> None:
    """Remove a method and its aliases (for tests that register a method of their own)."""
    del _REGISTRY[name]
    for alias in [a for a, n in _ALIASES.items() if n == name]:
        del _ALIASES[alias]


def methods() -> list[ComposeMethod]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())


def method_names() -> list[str]:
    """The accepted ``--method`` values: canonical names, then the PEFT aliases that differ."""
    return list(_REGISTRY) + [a for a in _ALIASES if a not in _REGISTRY]


def get_method(name: str) -> ComposeMethod:
    """The method called ``name`` (a loratool name or a PEFT alias)."""
    method = _REGISTRY.get(_ALIASES.get(name, name))
    if method is None:
        aliases = [a for a in _ALIASES if a not in _REGISTRY]
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}"
                         + (f" (or PEFT's {', '.join(aliases)})" if aliases else ""))
    return method


def methods_help() -> str:
    """The ``--method`` help: each method, the PEFT name it equals, what it does."""
    parts = []
    for m in methods():
        peft = f" (PEFT: {'/'.join(m.peft_aliases)})" if m.peft_aliases else ""
        parts.append(f"{m.name}{peft}: {m.summary}")
    return ("; ".join(parts) + ". The PEFT names are accepted too. loratool's linear is PEFT's svd: PEFT's own "
            "linear, ties, dare_* and magnitude_prune (without _svd) combine the A and B factors separately, "
            "so their delta is not the weighted combination; loratool has no equivalent of them.")
