"""Module-name patterns with bounded cost (loratool/patterns.py, issue 11).

PEFT is the oracle for what a pattern means (``peft.utils.other.get_pattern_key`` for
rank_pattern/alpha_pattern keys, ``re.fullmatch`` for a target_modules string, dot-suffixes for a
list); loratool must agree with it on every ordinary pattern, answer pathological ones in
linear time, and refuse what RE2 cannot run with one line.
"""

from __future__ import annotations

import random
import re

import pytest
from peft.utils.other import get_pattern_key as peft_get_pattern_key

from loratool import patterns
from loratool.errors import FormatError
from loratool.patterns import MAX_REGEX_KEYS, MAX_SHAPES, FullPattern, KeyTable, NameList

NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj", "model.layers.1.mlp.up_proj",
    "q_proj", "base.model.Q_PROJ", "vision_tower.layers.3.k_proj", "model.embed_tokens", "lm_head",
    "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "text_encoder.q",
    "a.b", "a_b", "ab", "", ".", "a.", ".a", "émbed.tokens", "layers.٣.q_proj", "x1.y22.z333",
]

KEYS = [
    # module names, as tools write them (every "." a wildcard)
    "q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj",
    "a.b", "a_b", "embed_tokens", "lm_head", "to_q", "",
    # escaped punctuation: still no regex engine
    r"layers\.0\.self_attn\.q_proj", r"a\.b", r"q\_proj", r"a\-b",
    # real regular expressions
    r"layers\.\d+\.mlp\..*", r".*q_proj", r"(q|k|v)_proj", r"q_proj|k_proj", r"[a-z]+_proj",
    r"\w+\.q_proj", r"layers\.1\d*\..*", r"mlp\..*_proj$", r"^model.*", r".*", r"\d+\..*",
    r"layers\.[0-9]{1,2}\..*", r"(?:self_attn|mlp)\.\w+", r"\S+", r"\bq_proj", r".*\Bproj",
    r"[A-Z_]+", r"[^.]+", r"[^\d]+", r"(x|y){0,3}", r"q_pro{1,2}j", r"q_p*?roj", r"\x71_proj",
    r"a{,3}", r"(?i:Q)_proj", r"[\W\d]+", r"\w", r"émbed\..*", r"(?s:.)+",
    r"(a|ab)(c|bcd)(d*)", r"to_[qkv]|attn1\..*",
]


def _peft(keys, name):
    key = peft_get_pattern_key(keys, name)
    return key if key in keys else None


@pytest.mark.parametrize("key", KEYS)
def test_one_key_matches_like_peft(key):
    table = KeyTable([key])
    for name in NAMES:
        assert table.first(name) == _peft([key], name), (key, name)


@pytest.mark.parametrize("pattern", KEYS)
def test_target_modules_string_matches_like_re_fullmatch(pattern):
    full = FullPattern(pattern)
    for name in NAMES:
        assert full.fullmatch(name) == (re.fullmatch(pattern, name) is not None), (pattern, name)


@pytest.mark.parametrize("keys, expected", [
    (["q_proj", r".*", "model.layers.0.self_attn.q_proj"], "q_proj"),
    ([r".*attn\.q_proj", "q_proj"], r".*attn\.q_proj"),
    (["k_proj", r"layers\.1\..*", "self_attn.q_proj", r".*"], "self_attn.q_proj"),
    ([r"(?:x)?q_proj", "q_proj"], r"(?:x)?q_proj"),
    (["k_proj", r"layers\.0\..*", "q_proj"], r"layers\.0\..*"),
    (["v_proj", r"layers\.1\..*"], None),
])
def test_first_matching_key_in_dict_order_wins(keys, expected):
    """PEFT takes ``next(filter(...))`` over the keys: order decides, not specificity."""
    name = "model.layers.0.self_attn.q_proj"
    assert KeyTable(keys).first(name) == _peft(keys, name) == expected


def test_random_key_sets_agree_with_peft():
    """A seeded differential run: random keys built from plain text, escapes, wildcards and
    regex constructs, random names over the same alphabet; first match by PEFT's own code."""
    rng = random.Random(11)
    atoms = ["a", "b", ".", r"\.", "_", r"\_", "(a|b)", "a*", "[ab.]", "[^a]", r"\w", r"\d", "1",
             "(?:a.)?", "$", "^", r"\b", "b+?", ".*"]
    checked = 0
    for _ in range(300):
        keys = ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 5))]
        try:
            table = KeyTable(keys)
        except FormatError:  # only when PEFT's template is no valid regex either
            with pytest.raises(re.error):
                for k in keys:
                    re.compile(rf"(.*\.)?({k})$")
            continue
        for _ in range(8):
            name = "".join(rng.choice("ab._1") for _ in range(rng.randint(0, 8)))
            assert table.first(name) == _peft(keys, name), (keys, name)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("key, name", [
    ("q", "q\n"), ("q", "x.q\n"), (r"q.", "q\n"), ("q", "a\nb.q"), ("a.b", "a\nb"), (r"x\.q", "x.q\n"),
    (r"(q|k)", "x.q\n"), (r"(q|k)", "a\nb.q"), (".*", "a\nb"),
])
def test_newlines_in_names_follow_python(key, name):
    """``$`` matches before a final newline and ``.*`` stops at one: PEFT's template, exactly."""
    assert KeyTable([key]).first(name) == _peft([key], name)


@pytest.mark.parametrize("names, name", [
    (["q_proj"], "model.layers.0.self_attn.q_proj"), (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["attn.q_proj"], "model.layers.0.self_attn.q_proj"), (["q_proj"], "q_proj"), (["proj"], "q_proj"),
    ([""], "a."), ([""], "a"), (["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
])
def test_name_list_matches_like_peft(names, name):
    peft = name in names or any(name.endswith(f".{t}") for t in names)
    assert NameList(names).selects(name) == peft


# -- refusals: one line, naming the key ---------------------------------------------------------

@pytest.mark.parametrize("key, phrase", [
    (r"(?<=self_attn\.)q_proj", "lookbehind"),
    (r"(?<!vision\.)q_proj", "lookbehind"),
    (r"(?!vision).*q_proj", "lookahead"),
    (r"(q)_proj\.\1", "backreference"),
    (r"(?P<p>q)(?P=p)", "backreference"),
    (r"(q)?(?(1)_proj|k)", "conditional"),
    (r"(?>q_proj)", "atomic group"),
    (r"q*+_proj", "possessive"),
    (r"q{2000}", "at most 1000"),
    (r"[^\W\d]+", "negates a class"),
    (r"q_proj)|(k", None),  # valid once pasted into PEFT's template: no refusal
    (r"(q_proj", "not a valid regular expression"),
    ("q_proj\\", "bad escape"),
    (r"(?i)q_proj", "global flags"),
    ("(" * 2000 + ")" * 2000, "nested too deeply"),
])
def test_refused_keys_give_one_line(key, phrase):
    if phrase is None:
        assert KeyTable([key], "cfg.json: rank_pattern").first("x.q_proj") == _peft([key], "x.q_proj")
        return
    with pytest.raises(FormatError) as e:
        KeyTable([key], "cfg.json: rank_pattern")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cfg.json: rank_pattern key ")
    assert phrase in msg, msg


def test_re2_errors_print_nothing(capfd):
    """RE2 logs parse errors to stderr unless told not to: the user must see our line only."""
    for pattern in (r"(a{1000}){2}", r"\w{1000}"):
        with pytest.raises(FormatError, match="cannot be evaluated with RE2"):
            FullPattern(pattern, "target_modules")
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""


def test_limits():
    with pytest.raises(FormatError, match=f"at most {MAX_REGEX_KEYS}"):
        KeyTable([rf"layers\.{i}\..*" for i in range(MAX_REGEX_KEYS + 1)], "rank_pattern")
    with pytest.raises(FormatError, match=f"more than {MAX_SHAPES} different layouts"):
        KeyTable(["a" * i + "." + "b" for i in range(MAX_SHAPES + 1)], "rank_pattern")
    with pytest.raises(FormatError, match="characters long"):
        FullPattern("(a|b)" * (patterns.MAX_PATTERN_CHARS // 5 + 1), "target_modules")


# -- bounded cost -------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [r"(.|.)*Z", r"(a+)+$", r"(a|aa)+b", r"(\w+\s?)*$", r"(x+x+)+y", r"(.*a){20}"])
def test_catastrophic_patterns_run_in_linear_time(key):
    """Each of these takes Python's re minutes to hours on such names."""
    names = ["a" * 2000, "model." + "a" * 60 + "!", "x" * 5000, "model.layers.0.self_attn.q_proj" * 40]
    table, full = KeyTable([key]), FullPattern(key)
    # real regex keys run on RE2 (an automaton: linear in the name, whatever the pattern), never
    # on Python's backtracking re; the times are bench/bench_patterns.py's
    assert all(type(rx._rx).__module__.startswith("re2") for _, rx in table._regex) and table._regex
    assert type(full._regex._rx).__module__.startswith("re2")
    for name in names:
        table.first(name)
        full.fullmatch(name)


@pytest.mark.parametrize("escaped", [False, True])
def test_100k_keys_build_once_and_look_up_fast(escaped):
    keys = [rf"model\.layers\.{i}\.self_attn\.q_proj" if escaped else f"model.layers.{i}.self_attn.q_proj"
            for i in range(100_000)]
    table = KeyTable(keys)
    assert not table._regex  # plain names: dict lookups, no regex at all
    layers = range(0, 100_000, 997)
    names = [f"base_model.model.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "k_proj")]
    got = [table.first(n) for n in names]
    assert got[0::2] == [keys[i] for i in layers] and got[1::2] == [None] * len(layers)


def test_regex_keys_are_compiled_once_per_table():
    keys = [rf"layers\.{i}\.(q|k)_proj" for i in range(MAX_REGEX_KEYS)]
    table = patterns.key_table(tuple(keys), "rank_pattern")
    assert patterns.key_table(tuple(keys)) is table  # cached by the keys alone
    compiled = [rx for _, rx in table._regex]
    assert len(compiled) == len(keys)  # one compiled matcher per key, made with the table
    for i in range(200):
        assert table.first(f"model.layers.{i}.k_proj") == keys[i]
    assert all(a is b for (_, a), b in zip(table._regex, compiled, strict=True))  # the same ones, reused
