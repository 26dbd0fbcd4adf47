"""Tables that fit an 80-column terminal: every number printed whole (names wrap, optional
columns are dropped and named), checked in a pseudo-terminal as a user would see them."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from loratool.cli.tables import Column, fitted
from loratool.text import natural_key

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(columns: int, *args, env: dict | None = None) -> str:
    """``loratool ARGS`` with stdout and stderr on a pseudo-terminal ``columns`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "LORATOOL_DEBUG")},
           **(env or {})}
    env.update(TERM="xterm", NO_COLOR="1")
    p = subprocess.Popen([sys.executable, "-m", "loratool", *map(str, args)], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(master)
    assert p.wait(timeout=120) == 0, out.decode(errors="replace")
    return ANSI.sub("", out.decode()).replace("\r", "")


def test_inspect_spectrum_at_80_columns(fixtures_dir, cli):
    adapter = fixtures_dir / "llama_rslora_patterns"
    text = run_in_terminal(80, "inspect", "--spectrum", "--modules", adapter)
    report = json.loads(cli("inspect", "--spectrum", "--modules", "--json", adapter).stdout)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in text
    for m in report["modules"]:
        s = m["spectrum"]
        numbers = [f"{s['singular_values'][0]:.4g}", str(s["effective_rank_90"]), f"{s['top_energy']:.1%}",
                   str(m["rank"]), f"{m['scale']:.4g}"]
        row = next(line for line in lines if f"{s['top_energy']:.1%}" in line and f"{s['singular_values'][0]:.4g}" in line)
        assert all(re.search(rf"(^|\s){re.escape(n)}(\s|$)", row) for n in numbers), (row, numbers)
    # a wrapped name is whole once its pieces are joined: a row's first cell, then the lines that
    # hold one piece only
    names, start = [], next(i for i, line in enumerate(lines) if line.startswith("module ") and " rank " in line) + 2
    for line in lines[start:]:
        parts = line.split()
        if line.startswith("("):  # the caption: which columns were left out
            assert "left out to fit 80 columns" in line
            break
        if len(parts) > 1 and not line.startswith(" "):
            names.append(parts[0])
        elif len(parts) == 1 and names and not line.startswith(" "):
            names[-1] += parts[0]
        elif not parts:
            break
    assert names == sorted((m["name"] for m in report["modules"]), key=natural_key)


def test_parity_at_80_columns(fixtures_dir, tmp_path):
    from loratool.merge import check_parity, merge

    adapters = f"{fixtures_dir / 'llama_r8'}:0.7,{fixtures_dir / 'llama_rslora_patterns'}:0.3"
    merge(fixtures_dir / "base_llama", adapters, tmp_path / "m", device="cpu")
    report = check_parity(fixtures_dir / "base_llama", tmp_path / "m", [adapters])
    text = run_in_terminal(80, "parity", "--base", fixtures_dir / "base_llama", "--merged", tmp_path / "m",
                           "--adapters", adapters, "--all", "--quiet")
    # (a warning is one line for logs and greps; the terminal wraps it)
    assert all(len(line) <= 80 for line in text.splitlines() if not line.startswith("loratool: warning:"))
    assert "…" not in text
    for lay in report.layers:
        assert f"{lay.max_abs_err:.3g}" in text and f"{lay.max_err_over_tol:.3f}" in text


def test_fitted_drops_optional_columns_and_names_them():
    from rich.console import Console

    cols = [Column("name", flexible=True), Column("shape", drop=2), Column("dtype", drop=1),
            Column("value", right=True)]
    rows = [["a.very.long.module.name.that.wraps", "4096×4096", "BF16", "123456.789"]] * 3
    con = Console(width=40, file=None, color_system=None, highlight=False)
    with con.capture() as cap:
        con.print(fitted(cols, rows, 40))
    out = cap.get()
    assert "123456.789" in out and "BF16" in out and "4096×4096" not in out
    assert "left out to fit 40 columns: shape;" in out.replace("\n", " ")
    assert all(len(line) <= 40 for line in out.splitlines())
    con = Console(width=200, file=None, color_system=None, highlight=False)
    with con.capture() as cap:
        con.print(fitted(cols, rows, 200))
    assert "4096×4096" in cap.get() and "left out" not in cap.get()


def test_registry_tables_at_80_columns(fixtures_dir, tmp_path, cli):
    env = {"LORATOOL_HOME": str(tmp_path / "home")}
    assert run_in_terminal(80, "registry", "list", env=env).strip() == "no adapters registered"
    assert not (tmp_path / "home").exists()  # a read-only command creates no registry
    for path, name in ((fixtures_dir / "llama_r8", "llama"), (fixtures_dir / "kohya_sd.safetensors", "sd-style")):
        assert cli("registry", "add", path, "--name", name, env=env).returncode == 0
    listing = run_in_terminal(80, "registry", "list", env=env)
    shown = run_in_terminal(80, "registry", "show", "llama", env=env)
    details = json.loads(cli("registry", "show", "llama", "--json", env=env).stdout)
    for text in (listing, shown):
        assert all(len(line) <= 80 for line in text.splitlines()) and "…" not in text, text
    assert "69.1 KiB" in listing and "2, 4, 8" in listing
    flat = "".join(line.strip() for line in shown.splitlines())  # wrapped values are whole once joined
    assert f"sha256:{details['entry']['digest']}" in flat.replace(" ", "")
    assert all(f["sha256"] in flat.replace(" ", "") for f in details["files"])


def test_compose_at_80_columns(fixtures_dir, tmp_path, cli):
    specs = f"{fixtures_dir / 'llama_r8'}:0.7,{fixtures_dir / 'llama_rslora_patterns'}:0.3"
    text = run_in_terminal(80, "compose", "--adapters", specs, "--rank", "8", "-o", tmp_path / "c", "--quiet")
    report = json.loads(cli("compose", "--adapters", specs, "--rank", "8", "-o", tmp_path / "j", "--json").stdout)
    assert all(len(line) <= 80 for line in text.splitlines()) and "…" not in text, text
    for m in report["modules"]:
        assert f"{m['energy_kept']:.4%}" in text and f"{m['relative_error']:.3e}" in text


def test_plain_grid_draws_what_rich_table_draws():
    """``fitted`` lays plain cells out itself (rich's Table costs ~2 ms a row); the text must be
    the same as rich's own layout of the same columns and widths, headers, folds and all."""
    import random

    from rich.console import Console

    from loratool.cli import tables

    rng = random.Random(0)
    for case in range(40):
        header = case % 2 == 0
        cols = [Column("module", flexible=True), Column("rank", right=True), Column("dtype", style="bold", drop=1),
                Column("σ1", right=True)]
        rows = [[".".join(f"layer{rng.randrange(30)}" for _ in range(rng.randrange(1, 6))),
                 str(rng.randrange(1, 300)), rng.choice(["F32", "BF16", "F16"]), f"{rng.random() * 100:.4g}"]
                for _ in range(rng.randrange(1, 8))]
        width = rng.randrange(24, 120)
        grid = fitted(cols, rows, width, header=header)
        assert isinstance(grid, tables._Grid)
        table = tables._table(cols, rows, grid.keep, grid.widths, grid.caption, header=header)
        outs = []
        for thing in (grid, table):
            con = Console(width=width, file=None, color_system=None, highlight=False)
            with con.capture() as cap:
                con.print(thing)
            outs.append(cap.get())
        assert outs[0] == outs[1], (width, header, rows)
