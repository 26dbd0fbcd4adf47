"""Progress output: plain periodic lines when stderr is not a terminal (CI logs), with percent,
bytes, rate and ETA; nothing with --quiet; a final line on success only."""

from __future__ import annotations

import io

import pytest

from loratool.cli import main
from loratool.cli.progress import PlainProgress, _duration
from loratool.cli.render import human_bytes


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_lines_every_interval_with_percent_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    p = PlainProgress("merging", out, interval=10.0, clock=clock)
    total = 400 << 20
    clock.t += 5
    p.advance(50 << 20, total)  # 5 s in: no line yet
    assert out.getvalue() == ""
    clock.t += 5
    p.advance(50 << 20, total)  # 10 s, 100 MiB of 400 MiB: 10 MiB/s, 30 s left
    assert out.getvalue().splitlines() == [
        "loratool: merging: 25% (100.0 MiB of 400.0 MiB), 10.0 MiB/s, ETA 30 s"]
    clock.t += 3
    p.advance(100 << 20, total)  # within the interval of the last line: silent
    assert len(out.getvalue().splitlines()) == 1
    clock.t += 27
    p.advance(200 << 20, total)
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "loratool: merging: 100% (400.0 MiB of 400.0 MiB), 10.0 MiB/s, done in 40 s"
    assert p.lines == len(lines) == 3


def test_unknown_total_and_nothing_done():
    clock, out = Clock(), io.StringIO()
    p = PlainProgress("checking", out, interval=1.0, clock=clock)
    p.finish()  # nothing done: no line
    assert out.getvalue() == ""
    clock.t += 2
    p.advance(2048, 0)
    assert out.getvalue() == "loratool: checking: 2.0 KiB, 1.0 KiB/s\n"


def test_binary_units_and_durations():
    assert human_bytes(512) == "512 B" and human_bytes(3 << 30) == "3.0 GiB" and human_bytes(1536) == "1.5 KiB"
    assert _duration(59.4) == "59 s" and _duration(125) == "2 min 05 s" and _duration(7322) == "2 h 02 min"


def test_a_merge_in_a_log_ends_with_one_plain_line(cli, fixtures_dir, tmp_path):
    p = cli("merge", "--base", fixtures_dir / "base_llama", "--adapters", fixtures_dir / "llama_r8",
            "-o", tmp_path / "m")
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("loratool: merging:")]
    assert len(lines) == 1 and lines[0].startswith("loratool: merging: 100% (") and "done in" in lines[0], p.stderr
    q = cli("merge", "--base", fixtures_dir / "base_llama", "--adapters", fixtures_dir / "llama_r8",
            "-o", tmp_path / "q", "--quiet")
    assert q.returncode == 0 and "merging" not in q.stderr, q.stderr


def test_counts_of_other_units():
    clock, out = Clock(), io.StringIO()
    p = PlainProgress("composing", out, interval=10.0, clock=clock, unit="modules")
    clock.t += 10
    p.advance(1, 154)  # counts arrive one at a time
    for _ in range(49):
        p.advance(1, 154)
    assert out.getvalue().splitlines() == ["loratool: composing: 0% (1 of 154 modules), 0.1 modules/s, ETA 25 min 30 s"]
    clock.t += 10
    p.advance(104, 154)
    p.finish()
    assert out.getvalue().splitlines()[-1] == "loratool: composing: 100% (154 of 154 modules), 7.7 modules/s, done in 20 s"
    q = PlainProgress("composing", io.StringIO(), interval=1.0, clock=clock, unit="modules")
    assert q.line().startswith("loratool: composing: 0 modules, 0.0 modules/s")


def test_a_compose_in_a_log_ends_with_one_plain_line(fixtures_dir, tmp_path, capsys):
    a, b = fixtures_dir / "llama_r8", fixtures_dir / "llama_r8_bf16"
    for out, quiet in (("c", []), ("q", ["--quiet"])):
        with pytest.raises(SystemExit) as e:
            main(["compose", "--adapters", f"{a}:0.7,{b}:0.3", "-o", str(tmp_path / out), "--method", "ties",
                  "--density", "0.5", "--rank", "4", *quiet])
        assert e.value.code == 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("loratool: composing:")]
        if quiet:
            assert "composing" not in err, err
        else:
            assert len(lines) == 1 and lines[0].startswith("loratool: composing: 100% (") and " modules), " in lines[0], err
