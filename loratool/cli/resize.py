"""`loratool resize`, and the rank-rule options it shares with `compose`."""

from __future__ import annotations

import click

from loratool.cli.render import FORMAT_CHOICE, emit, warn


def rank_rule_options(f):
    """--rank / --energy / --sv-ratio / --sv-cumulative / --min-rank / --max-rank."""
    options = [
        click.option("--rank", type=int, default=None, help="Keep K components per module (a module never gets more than it has)."),
        click.option("--energy", type=float, default=None,
                     help="Keep the smallest rank holding this share (0-1] of the squared singular values."),
        click.option("--sv-ratio", type=float, default=None, help="Keep singular values σ ≥ σ₁/R."),
        click.option("--sv-cumulative", type=float, default=None,
                     help="Keep the smallest rank holding this share (0-1] of the sum of singular values."),
        click.option("--min-rank", type=int, default=None, help="Lower bound on the rank a rule picks (default 1)."),
        click.option("--max-rank", type=int, default=None, help="Upper bound on the rank a rule picks."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@click.command("resize")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Where to write the resized adapter.")
@rank_rule_options
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None, help="Override format detection of ADAPTER.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def resize_cmd(adapter, out, rank, energy, sv_ratio, sv_cumulative, min_rank, max_rank, fmt, as_json, overwrite):
    """Truncate every module of ADAPTER to a lower rank (optimal, from the r×r core).

    Alpha is kept; the factors absorb the new scale. The output has the input's format and dtype.
    """
    from loratool.lowrank import RankRule
    from loratool.resize import resize_path

    rule = RankRule.from_options(rank, energy, sv_ratio, sv_cumulative, min_rank, max_rank)
    report = resize_path(adapter, out, rule, format=fmt, overwrite=overwrite)
    warn(report.warnings)
    emit(report, as_json, render)
    return 0


def render(r) -> None:
    from rich.table import Table

    from loratool.cli.render import console, human_count

    con = console()
    t = Table(header_style="bold")
    for col in ("module", "kind", "rank", "energy kept", "rel. error", ""):
        t.add_column(col, no_wrap=(col == "module"), justify="left" if col in ("module", "kind", "") else "right")
    for m in r.modules:
        rank = str(m.old_rank) if m.new_rank == m.old_rank else f"{m.old_rank} → {m.new_rank}"
        t.add_row(m.name, m.kind, rank, f"{m.energy_kept:.4%}", f"{m.relative_error:.3e}",
                  "" if m.status == "resized" else m.status)
    con.print(t)
    con.print(f"{r.num_resized} of {r.num_modules} modules resized ({r.rule}); parameters "
              f"{human_count(r.old_params)} → {human_count(r.new_params)}; energy kept {r.energy_kept:.4%}; "
              f"max relative error {r.max_relative_error:.3e}; alpha kept; wrote {r.output}")
