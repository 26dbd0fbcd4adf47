"""Module-name patterns with bounded cost (issue 11, "trust at the edges").

PEFT reads three config fields as Python regular expressions: every ``rank_pattern`` and
``alpha_pattern`` key (``re.match(rf"(.*\\.)?({key})$", name)``, the first key in dict order that
matches wins, ``peft.utils.other.get_pattern_key``), and ``target_modules`` / ``exclude_modules``
when they are a string (``re.fullmatch``). Python's ``re`` backtracks, so one key such as
``(.|.)*Z`` takes hours on a 30-character module name, and a config with 100,000 keys costs
modules × keys compilations. An adapter from a stranger must not do that to us, so:

* A *plain* key (literal characters, punctuation escaped with a backslash, and ``.`` — the
  wildcard every module name written as a key contains) is matched without any regex engine:
  keys are grouped by shape (length and wildcard positions), and each dot-suffix of a module
  name costs one dict lookup per shape of its length. Every module name is such a key, so the
  100,000-key configs that tools write stay linear.
* Any other key is parsed by Python's own parser (so that it means exactly what it means to
  ``re`` and to PEFT), translated construct by construct into RE2 syntax, and run by RE2
  (``google-re2``), whose matching time is linear in the name whatever the pattern.
* What RE2 cannot run — lookahead/lookbehind, backreferences, conditionals, atomic groups,
  possessive repeats, repeat counts over 1000 — and what Python cannot parse (PEFT itself would
  fail on it) is refused with one line naming the key.

The translation is exact for module names, with three edges no real module name reaches:
RE2's ``\\b`` knows ASCII word characters only (Python's knows all Unicode letters); Unicode
classes (``\\d``, ``\\w`` as ``\\p{Nd}``, ``[\\p{L}\\p{N}_]``) follow RE2's Unicode tables, which
may be a newer Unicode version than Python's; and a ``$`` inside a pattern matches only at the
end of the name (Python's also matches before a final newline; PEFT's own trailing ``$`` is
handled exactly). ``tests/test_patterns.py`` checks the rest against PEFT's own code.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from loratool.errors import FormatError

try:  # Python's own regex parser (the same one PEFT's patterns go through)
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 65536  # one key or one target_modules string
MAX_REGEX_KEYS = 256       # keys per rank_pattern/alpha_pattern that need a regex engine
MAX_SHAPES = 1024          # distinct (length, wildcard positions) shapes of plain keys
RE2_MAX_REPEAT = 1000      # RE2 refuses larger counts in {m,n}
# RE2's memory budget per pattern (program and DFA cache; past it RE2 falls back to its slower,
# still linear, NFA): so many keys cannot take more than MAX_REGEX_KEYS x KEY_MEM in all.
KEY_MEM = 1 << 20
PATTERN_MEM = 8 << 20      # the one target_modules / exclude_modules string

_META = re.compile(r"[\\^$*+?{}\[\]|()]")  # regex syntax other than "."
_PLAIN = re.compile(r"(?:[^\\^$*+?{}\[\]|()]|\\[^0-9A-Za-z])*")  # "." and escaped punctuation
_NOT_FOUND = 1 << 62


def _show(text: str, limit: int = 80) -> str:
    """A key for a message: repr (never a raw surrogate or newline), cut to ``limit``."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"


# -- plain keys ---------------------------------------------------------------------------------

class _Shape:
    """Plain keys of one length whose wildcards sit at the same positions. A key is stored as its
    *canonical* text: its characters, with "." at the wildcards; a text of that length matches
    it when the text with "." written over the same positions is that canonical text (and no
    wildcard falls on a newline, which "." does not match)."""

    __slots__ = ("length", "wild", "segments", "index")

    def __init__(self, length: int, wild: tuple[int, ...], index: dict[str, int] | None = None):
        self.length, self.wild = length, wild
        edges = (-1, *wild, length)
        self.segments = tuple((a + 1, b) for a, b in zip(edges, edges[1:]))
        self.index = index

    def canonical(self, text: str) -> str:
        return ".".join([text[a:b] for a, b in self.segments]) if self.wild else text


_TOKENS = re.compile(r"(\\.)", re.S)


def _plain(key: str) -> tuple[tuple[int, ...], str] | None:
    """(wildcard positions, canonical text) of a plain key; None for a real regex."""
    if _META.search(key) is None:  # the common case: a module name, its dots wildcards
        if "." not in key:
            return (), key
        wild, pos = [], -1
        for part in key.split(".")[:-1]:
            pos += len(part) + 1
            wild.append(pos)
        return tuple(wild), key
    if "\\" not in key or _PLAIN.fullmatch(key) is None:
        return None
    wild: list[int] = []
    text: list[str] = []
    n = 0
    for i, token in enumerate(_TOKENS.split(key)):
        if i % 2:  # an escape: one literal character (an escaped "." is no wildcard)
            text.append(token[1])
            n += 1
            continue
        p = token.find(".")
        while p >= 0:
            wild.append(n + p)
            p = token.find(".", p + 1)
        text.append(token)
        n += len(token)
    return tuple(wild), "".join(text)


# -- regex keys: Python's parse tree, written out for RE2 ----------------------------------------

_I, _M, _S, _A = int(re.IGNORECASE), int(re.MULTILINE), int(re.DOTALL), int(re.ASCII)
_ASCII_SPACE = " \t\n\r\f\v"
_UNICODE_SPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())  # Python's \s


def _x(c: int) -> str:
    return f"\\x{{{c:x}}}"


def _chars(chars: str) -> str:
    return "".join(_x(ord(c)) for c in chars)


def _category(cat, flags: int) -> tuple[str, bool]:
    """(class body, negated) for one of Python's \\d \\D \\s \\S \\w \\W."""
    ascii_ = bool(flags & _A)
    name = str(cat)
    if name.endswith("DIGIT"):
        body = "0-9" if ascii_ else r"\p{Nd}"
    elif name.endswith("SPACE"):
        body = _chars(_ASCII_SPACE if ascii_ else _UNICODE_SPACE)
    elif name.endswith("WORD"):
        body = "0-9A-Za-z_" if ascii_ else r"\p{L}\p{N}_"
    else:  # pragma: no cover - LINEBREAK/LOC_* categories never come out of a str pattern
        raise _Refused(f"uses the character class {name}, which loratool cannot evaluate")
    return body, "_NOT_" in name


class _Refused(Exception):
    """A construct that RE2 cannot run; the message says which (wrapped into a FormatError)."""


_REFUSED_OPS = {
    "ASSERT": "a lookahead or lookbehind ((?=…), (?!…), (?<=…), (?<!…))",
    "ASSERT_NOT": "a lookahead or lookbehind ((?=…), (?!…), (?<=…), (?<!…))",
    "GROUPREF": "a backreference (\\1, (?P=name))",
    "GROUPREF_EXISTS": "a conditional group ((?(1)…|…))",
    "ATOMIC_GROUP": "an atomic group ((?>…))",
    "POSSESSIVE_REPEAT": "a possessive repeat (*+, ++, ?+)",
}


def _case(text: str, flags: int) -> str:
    return f"(?i:{text})" if flags & _I else text


def _ascii_fold(flags: int) -> bool:
    """IGNORECASE under ASCII: Python folds A-Z/a-z only, so we spell the other case out instead
    of asking RE2, whose (?i) folds all of Unicode."""
    return bool(flags & _I and flags & _A)


def _literal(c: int, flags: int, negated: bool = False) -> str:
    if _ascii_fold(flags):
        cases = {c, ord(chr(c).swapcase())} if c < 128 and chr(c).isalpha() else {c}
        return f"[{'^' if negated else ''}{''.join(_x(x) for x in sorted(cases))}]"
    if negated:
        return _case(f"[^{_x(c)}]", flags)
    return _case(_x(c), flags) if chr(c).lower() != chr(c).upper() else _x(c)


def _in(items, flags: int) -> str:
    """A character class. Python's negated categories (\\D \\S \\W) inside a class become
    alternatives, as RE2 has no class subtraction; inside a negated class that is impossible."""
    negate = bool(items) and str(items[0][0]) == "NEGATE"
    body, negated_cats = [], []
    for op, av in items[1:] if negate else items:
        op = str(op)
        if op == "LITERAL":
            body.append(_x(av))
            if _ascii_fold(flags) and av < 128 and chr(av).isalpha():
                body.append(_x(ord(chr(av).swapcase())))
        elif op == "RANGE":
            body.append(f"{_x(av[0])}-{_x(av[1])}")
            if _ascii_fold(flags):
                body += [_x(ord(chr(c).swapcase())) for c in range(av[0], min(av[1], 127) + 1) if chr(c).isalpha()]
        elif op == "CATEGORY":
            cat, neg = _category(av, flags)
            (negated_cats if neg else body).append(cat)
        else:  # pragma: no cover - nothing else comes out of the parser inside [...]
            raise _Refused(f"uses {op} inside a character class, which loratool cannot evaluate")
    fold = flags & ~_I if _ascii_fold(flags) else flags
    if negate:
        if negated_cats:
            raise _Refused(r"negates a class holding \D, \S or \W (such as [^\W\d]), which RE2 cannot "
                           "express; list the characters instead")
        return _case(f"[^{''.join(body)}]", fold)
    alts = [_case(f"[{''.join(body)}]", fold)] if body else []
    alts += [f"[^{cat}]" for cat in negated_cats]
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _repeat(lo: int, hi: int, item: str, lazy: bool) -> str:
    unbounded = hi == _sre.MAXREPEAT
    if lo > RE2_MAX_REPEAT or (not unbounded and hi > RE2_MAX_REPEAT):
        raise _Refused(f"repeats {hi if not unbounded and hi > RE2_MAX_REPEAT else lo} times; RE2 allows at "
                       f"most {RE2_MAX_REPEAT}")
    if (lo, unbounded) == (0, True):
        q = "*"
    elif (lo, unbounded) == (1, True):
        q = "+"
    elif (lo, hi) == (0, 1):
        q = "?"
    elif unbounded:
        q = f"{{{lo},}}"
    else:
        q = f"{{{lo},{hi}}}" if lo != hi else f"{{{lo}}}"
    return f"(?:{item}){q}{'?' if lazy else ''}"


def _at(code, flags: int) -> str:
    name = str(code)
    if name == "AT_BEGINNING":
        return "(?m:^)" if flags & _M else r"\A"
    if name == "AT_BEGINNING_STRING":
        return r"\A"
    if name == "AT_END":
        return "(?m:$)" if flags & _M else r"\z"
    if name == "AT_END_STRING":
        return r"\z"
    if name == "AT_BOUNDARY":
        return r"\b"
    if name == "AT_NON_BOUNDARY":
        return r"\B"
    raise _Refused(f"uses the anchor {name}, which loratool cannot evaluate")  # pragma: no cover


def _emit(items, flags: int) -> str:
    out = []
    for op, av in items:
        op = str(op)
        if op in _REFUSED_OPS:
            raise _Refused(f"uses {_REFUSED_OPS[op]}, which RE2 cannot evaluate (loratool runs patterns "
                           "with RE2 so that no pattern can make it hang); rewrite the pattern without it")
        if op == "LITERAL":
            out.append(_literal(av, flags))
        elif op == "NOT_LITERAL":
            out.append(_literal(av, flags, negated=True))
        elif op == "ANY":
            out.append("(?s:.)" if flags & _S else r"[^\n]")
        elif op == "IN":
            out.append(_in(av, flags))
        elif op == "AT":
            out.append(_at(av, flags))
        elif op == "BRANCH":
            out.append("(?:" + "|".join(_emit(alt, flags) for alt in av[1]) + ")")
        elif op == "SUBPATTERN":
            _group, add, drop, sub = av
            out.append("(?:" + _emit(sub, (flags | add) & ~drop) + ")")
        elif op in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, sub = av
            out.append(_repeat(lo, hi, _emit(sub, flags), lazy=op == "MIN_REPEAT"))
        elif op == "CATEGORY":  # pragma: no cover - the parser wraps categories in IN
            out.append(_in([(op, av)], flags))
        else:  # pragma: no cover - every opcode the parser emits is handled above
            raise _Refused(f"uses {op}, which loratool cannot evaluate")
    return "".join(out)


def _parse_problem(key: str | None, error: Exception) -> str:
    """Python's complaint, about the key itself where it has one (positions then count in the
    key, not in PEFT's template around it)."""
    if key is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _sre_parse.parse(key, 0)
        except (re.error, ValueError, OverflowError, RecursionError) as own:
            return str(own)
        return f"{getattr(error, 'msg', error)} once PEFT pastes it into (.*\\.)?(KEY)$"
    return str(error)


def _re2():
    try:
        import re2  # google-re2: imported only when a config holds a real regular expression
    except ImportError:  # pragma: no cover - a dependency of loratool
        raise FormatError("evaluating this regular expression needs the google-re2 package "
                          "(pip install google-re2)") from None
    return re2


class Regex:
    """One pattern, parsed by Python's parser and run by RE2: ``fullmatch(name)``."""

    __slots__ = ("source", "_rx", "_anchor")

    def __init__(self, pattern: str, what: str, key: str | None = None, max_mem: int = PATTERN_MEM):
        """``key``: the rank/alpha pattern key that ``pattern`` (PEFT's template) was made from,
        for error messages about the key itself."""
        self.source = pattern
        if len(pattern) > MAX_PATTERN_CHARS:
            raise FormatError(f"{what} is {len(pattern)} characters long; loratool evaluates patterns of at most "
                              f"{MAX_PATTERN_CHARS} characters")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Python 3.10 warns about misplaced inline flags
                tree = _sre_parse.parse(pattern, 0)
            translated = _emit(tree.data, tree.state.flags)
        except (re.error, ValueError, OverflowError) as e:
            raise FormatError(f"{what} is not a valid regular expression ({_parse_problem(key, e)}); PEFT "
                              "would fail to load this config") from None
        except RecursionError:
            raise FormatError(f"{what} is nested too deeply to be evaluated") from None
        except _Refused as e:
            raise FormatError(f"{what} {e}") from None
        self._rx, self._anchor = _re2_compile(translated, max_mem, what)

    def matches(self, data: bytes) -> bool:
        """Whether the pattern matches all of ``data`` (a name, UTF-8: ``encode_name``)."""
        return self._rx.Match(self._anchor, data, 0, len(data))[0][0] != -1

    def fullmatch(self, name: str) -> bool:
        return self.matches(encode_name(name))


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogatepass")  # a lone surrogate matches what "." matches, no crash


def _re2_compile(translated: str, max_mem: int, what: str):
    """RE2's own matcher object and its full-match anchor. We call google-re2's pybind layer
    (``_re2.RE2.Match``) directly: its ``re``-like wrapper spends ~30 µs a call on offset
    bookkeeping that a yes/no full match does not need, and keeps 128 patterns in a cache."""
    re2 = _re2()
    options = re2.Options()
    options.log_errors = False  # errors come back to us, never printed on stderr
    options.max_mem = max_mem
    rx = re2._re2.RE2(translated.encode("utf-8"), options)
    if not rx.ok():
        why = rx.error()
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        raise FormatError(f"{what} cannot be evaluated with RE2 ({why})")
    return rx, re2._re2.RE2.Anchor.ANCHOR_BOTH


# -- tables -------------------------------------------------------------------------------------

def _tails(name: str) -> list[str]:
    """The texts that PEFT's ``(.*\\.)?(key)$`` lets ``key`` match: the name, and every part after
    a dot (``.*`` stops at a newline); each also without a final newline (``$`` matches before
    one)."""
    stop = name.find("\n")
    stop = len(name) if stop < 0 else stop
    starts = [0]
    p = name.find(".", 0, stop)
    while p >= 0:
        starts.append(p + 1)
        p = name.find(".", p + 1, stop)
    tails = [name[j:] for j in starts]
    if name.endswith("\n"):
        tails += [name[j:-1] for j in starts if j < len(name)]
    return tails


_MASK = bytes(c if c in b".\0" else ord("x") for c in range(256))  # every byte but "." and NUL -> "x"


class _TooManyShapes(Exception):
    pass


def _wild(mask: bytes) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(mask) if c == 46)  # the "." positions


def _bulk(keys: list[str]) -> str | None:
    """The keys joined by NUL, when they can be processed in bulk: ASCII (so that bytes and
    characters line up) and holding no NUL themselves."""
    joined = "\0".join(keys)
    return joined if joined.isascii() and joined.count("\0") == len(keys) - 1 else None


def _name_shapes(names: list[str]) -> set[tuple[int, tuple[int, ...]]]:
    """The distinct (length, "." positions) of module-name keys: for ASCII keys (all real ones)
    made in bulk, one bytes.translate over all keys and one set."""
    joined = _bulk(names)
    if joined is None:
        shapes = {(len(k), _plain(k)[0]) for k in names}
    else:
        masks = set(joined.encode("ascii").translate(_MASK).split(b"\0"))
        if len(masks) > MAX_SHAPES:
            raise _TooManyShapes
        shapes = {(len(m), _wild(m)) for m in masks}
    if len(shapes) > MAX_SHAPES:
        raise _TooManyShapes
    return shapes


def _escaped_shapes(keys: list[str], idx: list[int]) -> list[_Shape]:
    """Shapes of plain keys with escapes (``layers\\.0\\.q_proj``), each holding its keys'
    canonical texts. Without an escaped backslash every backslash is an escape, so texts and
    wildcard masks are made in bulk: drop the backslashes; an escaped "." is no wildcard."""
    joined = _bulk(keys)
    if joined is not None and "\\\\" not in joined:
        texts = joined.replace("\\", "").split("\0")
        masks = joined.replace("\\.", "x").replace("\\", "").encode("ascii").translate(_MASK).split(b"\0")
        distinct = set(masks)
        if len(distinct) > MAX_SHAPES:
            raise _TooManyShapes
        wild_of = {m: _wild(m) for m in distinct}
        items = ((i, t, len(m), wild_of[m]) for i, t, m in zip(idx, texts, masks))
    else:
        items = ((i, text, len(text), wild) for i, (wild, text) in zip(idx, map(_plain, keys)))
    shapes: dict[tuple[int, tuple[int, ...]], _Shape] = {}
    for i, text, length, wild in items:
        shape = shapes.get((length, wild))
        if shape is None:
            if len(shapes) >= MAX_SHAPES:
                raise _TooManyShapes
            shape = shapes[(length, wild)] = _Shape(length, wild, {})
        shape.index.setdefault(text, i)  # the first of equal keys wins
    return list(shapes.values())


class KeyTable:
    """The keys of a ``rank_pattern``/``alpha_pattern``, in order: ``first(name)`` is the key PEFT
    picks for module ``name`` (``get_pattern_key``: the first key that matches), None when no
    key matches. Built once per config; a lookup costs one dict probe per dot-suffix of the name
    and key shape of its length, plus RE2 runs of the regex keys that come before the best
    plain match."""

    def __init__(self, keys: Iterable[str], what: str = "pattern"):
        self.keys: list[str] = list(keys)
        self._by_length: dict[int, list[_Shape]] = {}
        self._regex: list[tuple[int, Regex]] = []
        meta = _META.search
        name_idx: Sequence[int] = range(len(self.keys))
        names, plain_idx, regex_idx = self.keys, [], []
        if meta("\0".join(self.keys)) is not None:  # not all module names (the 100,000-key case)
            name_idx, others = [], []
            for i, k in enumerate(self.keys):
                (name_idx if meta(k) is None else others).append(i)
            names = [self.keys[i] for i in name_idx]
            # With every backslash escaping a "." (layers\.0\.q_proj), no regex syntax is left
            # once those are gone; anything else is checked exactly by _PLAIN.
            if meta("\0".join(self.keys[i] for i in others).replace("\\.", "")) is None:
                plain_idx = others
            else:
                for i in others:
                    k = self.keys[i]
                    plain = meta(k.replace("\\.", "")) is None or _PLAIN.fullmatch(k) is not None
                    (plain_idx if plain else regex_idx).append(i)
        if len(regex_idx) > MAX_REGEX_KEYS:
            raise FormatError(f"{what} has {len(regex_idx)} keys that are regular expressions; loratool evaluates "
                              f"at most {MAX_REGEX_KEYS} (keys that are plain module names are not limited)")
        # Module-name keys are their own canonical text: one dict for all their shapes, built in
        # C, reversed so that the first of equal keys wins.
        first_of = dict(zip(reversed(names), reversed(name_idx)))
        try:
            shapes = [_Shape(length, wild) for length, wild in sorted(_name_shapes(names))] if names else []
            shapes += _escaped_shapes([self.keys[i] for i in plain_idx], plain_idx)
            if len(shapes) > MAX_SHAPES:
                raise _TooManyShapes
        except _TooManyShapes:
            raise FormatError(f"{what} has keys of more than {MAX_SHAPES} different layouts (length and '.' "
                              "positions); loratool matches at most that many") from None
        for shape in shapes:
            if shape.index is None:
                shape.index = first_of
            self._by_length.setdefault(shape.length, []).append(shape)
        for i in regex_idx:
            key = self.keys[i]
            template = rf"(.*\.)?({key})$"  # PEFT's own text, the key pasted in
            self._regex.append((i, Regex(template, f"{what} key {_show(key)}", key, max_mem=KEY_MEM)))

    def __len__(self) -> int:
        return len(self.keys)

    def first_index(self, name: str) -> int | None:
        best = _NOT_FOUND
        if self._by_length:
            newline = "\n" in name
            for tail in _tails(name):
                for shape in self._by_length.get(len(tail), ()):
                    if newline and any(tail[w] == "\n" for w in shape.wild):
                        continue
                    i = shape.index.get(shape.canonical(tail))
                    if i is not None and i < best:
                        best = i
        if self._regex and self._regex[0][0] < best:
            data = encode_name(name)
            texts = (data, data[:-1]) if data.endswith(b"\n") else (data,)
            for i, rx in self._regex:
                if i >= best:
                    break
                if rx.matches(texts[0]) or (len(texts) > 1 and rx.matches(texts[1])):
                    best = i
                    break
        return None if best == _NOT_FOUND else best

    def first(self, name: str) -> str | None:
        i = self.first_index(name)
        return None if i is None else self.keys[i]


class FullPattern:
    """A ``target_modules``/``exclude_modules`` string: ``re.fullmatch(pattern, name)``."""

    def __init__(self, pattern: str, what: str = "pattern"):
        self.source = pattern
        plain = _plain(pattern)
        self._shape: _Shape | None = None
        self._regex: Regex | None = None
        if plain is not None:
            wild, text = plain
            self._shape = _Shape(len(text), wild, {text: 0})
            self._length = len(text)
        else:
            self._regex = Regex(pattern, what)

    def fullmatch(self, name: str) -> bool:
        shape = self._shape
        if shape is None:
            return self._regex.fullmatch(name)
        return (len(name) == self._length and not any(name[w] == "\n" for w in shape.wild)
                and shape.canonical(name) in shape.index)


class NameList:
    """A ``target_modules``/``exclude_modules`` list: PEFT selects a module whose name is an
    entry or ends with ``"." + entry``; a set lookup per dot-suffix of the name."""

    def __init__(self, names: Sequence[str]):
        self.names = frozenset(names)

    def selects(self, name: str) -> bool:
        if name in self.names:
            return True
        p = name.find(".")
        while p >= 0:
            if name[p + 1:] in self.names:
                return True
            p = name.find(".", p + 1)
        return False


class _Cache:
    """A small LRU of built tables keyed by their source alone (the ``what`` of the first build
    only names the field in an error, which a later lookup of the same source cannot raise)."""

    def __init__(self, build, size: int):
        self.build, self.size = build, size
        self.items: OrderedDict = OrderedDict()

    def __call__(self, source, what: str = "pattern"):
        built = self.items.get(source)
        if built is None:
            built = self.items[source] = self.build(source, what)
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        else:
            self.items.move_to_end(source)
        return built


#: ``key_table(tuple(keys), what)``: a cached ``KeyTable``, so that module after module looked up
#: with the same keys builds (and compiles) it once.
key_table = _Cache(KeyTable, 16)
#: ``full_pattern(text, what)``: a cached ``FullPattern``.
full_pattern = _Cache(FullPattern, 64)
#: ``name_list(tuple(names))``: a cached ``NameList``.
name_list = _Cache(lambda names, what: NameList(names), 16)
