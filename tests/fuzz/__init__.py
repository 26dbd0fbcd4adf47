"""A deterministic, seeded fuzz harness for loratool's reading commands (issue 11, item 6).

Each run builds one hostile input in its own folder (mutation classes in ``mutators.py``), runs one
command on it (inspect, inspect --json, validate, validate --base, convert --to kohya/peft,
resize --rank 2, compose, merge, registry add) in a forked child of a warm server (``runner.py``),
and classifies the exit and its side effects (``harness.py``). ``tests/test_fuzz.py`` runs a few
hundred cases on every ``make test``; ``make fuzz`` runs thousands and prints counts per class:

    make fuzz FUZZ_RUNS=2000 FUZZ_SEED=1
    python -m tests.fuzz --runs 2000 --seed 1            # the same
    python -m tests.fuzz --seed 1 --case 123 --keep /tmp/c123   # rebuild and rerun one case
"""

from tests.fuzz.harness import ASSERTED, EFFECTS, OUTCOMES, Report, run_fuzz

__all__ = ["ASSERTED", "EFFECTS", "OUTCOMES", "Report", "run_fuzz"]
