"""The fuzz harness (tests/fuzz, issue 11 item 6).

A seeded run of a few hundred hostile inputs through every reading command must end with no
INTERNAL error, no HANG, no output PUBLISHED by a failed run, nothing written OUTSIDE the output
(and no secret or symlink leaked into it), and no input modified. `make fuzz` runs thousands.

The harness's own tests run stand-ins that misbehave on purpose (tests/fuzz/selftest.py): each
class must be seen, or the fuzz test could pass whatever loratool does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz.corpus import CORPUS
from tests.fuzz.harness import (
    ASSERTED,
    REPO,
    base_env,
    build_case,
    classify,
    run_case,
    run_fuzz,
    schedule,
    snapshot,
)
from tests.fuzz.mutators import Control, all_mutators
from tests.fuzz.runner import Runner
from tests.fuzz.workspace import COMMANDS, Fixtures

# Two visits of each of the 72 mutators in `make test` (the suite must stay under 10 minutes);
# `make fuzz FUZZ_RUNS=...` runs as many as you like.
FAST_RUNS = int(os.environ.get("LORATOOL_FUZZ_RUNS", "144"))
FAST_SEED = int(os.environ.get("LORATOOL_FUZZ_SEED", "0"))


def test_fuzz_fast(fixtures_dir):
    report = run_fuzz(fixtures_dir, FAST_RUNS, FAST_SEED, extra=CORPUS)
    print(report.text())
    assert len(report.results) == FAST_RUNS + len(CORPUS)
    assert {r.command for r in report.results} == set(COMMANDS)
    if FAST_RUNS >= len(all_mutators()):
        assert {r.mutator for r in report.results} == {m.name for m in all_mutators()}
    counts = report.counts()
    failed = {c: counts[c] for c in ASSERTED if counts.get(c)}
    assert not failed, f"{failed}\n{report.failure_text()}"


# -- the harness itself ---------------------------------------------------------------------------


class _Peft(Control):
    sources = ("llama_r8",)


# stand-in -> (outcome, side effects) the harness must report for a `resize ... -o OUT` case
SELFTEST = {
    "ok": ("ok", set()),
    "refuse": ("refused", set()),
    "two_lines": ("UNCLEAN", set()),
    "crash": ("INTERNAL", set()),
    "traceback_text": ("INTERNAL", set()),
    "lone_surrogate": ("INTERNAL", set()),
    "hang": ("HANG", set()),
    "publish": ("refused", {"PUBLISHED"}),
    "outside": ("ok", {"OUTSIDE"}),
    "outside_transient": ("ok", {"OUTSIDE"}),
    "home_write": ("ok", {"OUTSIDE"}),
    "sibling": ("ok", {"OUTSIDE"}),
    "leak": ("ok", {"OUTSIDE"}),
    "symlink_out": ("ok", {"OUTSIDE"}),
    "modify_input": ("ok", {"INPUT-MODIFIED"}),
    "stray": ("ok", {"STRAY"}),
}


@pytest.fixture(scope="module")
def cold_runner(tmp_path_factory):
    home = tmp_path_factory.mktemp("runner")
    env = dict(base_env(), HOME=str(home), TMPDIR=str(home), PYTHONPATH=str(REPO))
    runner = Runner(REPO, env, warm=False)  # the stand-ins need no loratool
    runner.start()
    yield runner
    runner.close()


@pytest.mark.parametrize("behaviour", SELFTEST)
def test_harness_sees(behaviour, cold_runner, fixtures_dir, tmp_path):
    outcome, effects = SELFTEST[behaviour]
    res = run_case(cold_runner, Fixtures(fixtures_dir), 0, 0, _Peft(), "resize", tmp_path / "cases" / "root",
                   tmp_path / "logs", timeout=2.0, entry=f"tests.fuzz.selftest:{behaviour}")
    assert (res.outcome, set(res.effects)) == (outcome, effects), res
    if behaviour == "crash":
        assert res.cause.startswith("ValueError at ") and res.message == "boom"


def test_validate_report_is_a_clean_refusal():
    reply = {"status": "exited", "code": 0, "result": {"rc": 1}}
    report = "ERROR   LT100 check: bad\nFAIL: x: 1 modules, 1 errors, 0 warnings\n"
    assert classify("validate", reply, report, "", "")[0] == "refused"
    assert classify("inspect", reply, report, "", "")[0] == "UNCLEAN"
    ok = {"status": "exited", "code": 0, "result": {"rc": 0}}
    assert classify("inspect_json", ok, "not json", "", "")[0] == "UNCLEAN"


def test_cases_are_rebuilt_byte_for_byte(fixtures_dir, tmp_path):
    """A (seed, index) pair names one input: the reproducer printed for a failure rebuilds it."""
    fixtures = Fixtures(fixtures_dir)
    mutators = all_mutators()

    def contents(root: Path) -> dict:
        kept = {"file": lambda e: e[5], "link": lambda e: e[1], "special": lambda e: e[2]}
        return {rel: (e[0], kept[e[0]](e)) for rel, e in snapshot(root).items() if e[0] != "dir"}

    for index, mutator, command in schedule(7, len(mutators)):
        built = []
        for attempt in range(2):
            root = tmp_path / f"case-{index}-{attempt}"
            ws, detail = build_case(fixtures, 7, index, mutator, command, tmp_path / "case")
            built.append((detail, ws.argv(command), contents(ws.root)))
            ws.root.rename(root)
        assert built[0] == built[1], mutator.name
    assert {m.name for _, m, _ in schedule(7, len(mutators))} == {m.name for m in mutators}
