"""Warnings that say the same about many modules are grouped on stderr (a resize above the rank
of 72 modules printed 72 lines)."""

from __future__ import annotations

from loratool.cli.render import warn


def test_warnings_of_one_shape_are_grouped(capsys):
    same = [f"module 'layers.{i}.q_proj': asked rank 16 is above its rank 8; left as it is" for i in range(72)]
    other = ["module 'layers.0.v_proj': asked rank 16 is above its rank 4; left as it is", "no manifest"]
    warn(same + other)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == [f"loratool: warning: {m}" for m in same[:3]]
    assert lines[3] == "loratool: warning: ... and 69 more like these (72 in all; --json lists them)"
    assert lines[4:] == [f"loratool: warning: {m}" for m in other]
    warn(same[:3])
    assert len(capsys.readouterr().err.splitlines()) == 3


def test_a_warning_naming_a_path_with_a_newline_stays_one_line(capsys):
    """Warnings are one line each, as errors are: a path holding a newline or a tab (the fuzzer's
    path.names) does not split one."""
    from loratool.cli.render import warn

    warn(["/tmp/x\\ny has no loratool manifest".replace("\\n", "\n"), "a\ttab and  spaces"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["loratool: warning: /tmp/x y has no loratool manifest", "loratool: warning: a tab and spaces"]
