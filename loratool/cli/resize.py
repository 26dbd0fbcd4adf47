"""`loratool resize`, and the rank-rule options it shares with `compose`."""

from __future__ import annotations

import click

from loratool.cli.render import FORMAT_CHOICE, emit, warn
from loratool.errors import UsageError
from loratool.lowrank import KOHYA_DYNAMIC_METHODS
from loratool.resize import SAVE_PRECISIONS


def rank_rule_options(f):
    """--rank / --energy / --sv-ratio / --sv-cumulative / --sv-fro / --min-rank / --max-rank (resize and
    compose)."""
    options = [
        click.option("--rank", type=int, default=None, help="Keep K components per module (a module never gets more than it has)."),
        click.option("--energy", type=float, default=None,
                     help="Keep the smallest rank holding this share (0-1] of the squared singular values."),
        click.option("--sv-ratio", type=float, default=None, help="Keep singular values σ ≥ σ₁/R."),
        click.option("--sv-cumulative", type=float, default=None,
                     help="Keep the smallest rank holding this share (0-1] of the sum of singular values (σ, not σ²; kohya's sv_cumulative)."),
        click.option("--sv-fro", type=float, default=None,
                     help="Keep the smallest rank holding this share (0-1] of the Frobenius norm, "
                          "sqrt(Σₖσ²/Σσ²) (kohya's sv_fro)."),
        click.option("--min-rank", type=int, default=None, help="Lower bound on the rank a rule picks (default 1)."),
        click.option("--max-rank", type=int, default=None, help="Upper bound on the rank a rule picks."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def kohya_resize_options(f):
    """resize only: kohya's --dynamic-method/--dynamic-param spelling of the sv_* rules,
    --conv-rank and --save-precision (sd-scripts' resize_lora.py options)."""
    options = [
        click.option("--dynamic-method", type=click.Choice(list(KOHYA_DYNAMIC_METHODS)), default=None,
                     help="kohya's spelling of --sv-ratio/--sv-fro/--sv-cumulative, with --dynamic-param."),
        click.option("--dynamic-param", type=float, default=None, help="The value of --dynamic-method's rule."),
        click.option("--conv-rank", type=int, default=None,
                     help="Rank for Conv2d modules with a kernel above 1×1 (kohya's --new_conv_rank): the "
                          "rule's rank, or its cap for the other rules (default: the rule as for the rest)."),
        click.option("--save-precision", type=click.Choice(list(SAVE_PRECISIONS)), default="keep", show_default=True,
                     help="Dtype of every output tensor (keep: each its own)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def dynamic_rule(method: str | None, param: float | None, given: dict) -> dict:
    """``given`` (rule name -> value) with kohya's --dynamic-method/--dynamic-param folded in as
    the rule of the same name; a one-line UsageError when only one of the pair is there."""
    if (method is None) != (param is None):
        raise UsageError("--dynamic-method and --dynamic-param go together (e.g. --dynamic-method sv_fro "
                         "--dynamic-param 0.9)")
    if method is None:
        return given
    name = KOHYA_DYNAMIC_METHODS[method]
    if given.get(name) is not None and given[name] != param:
        raise UsageError(f"--dynamic-method {method} --dynamic-param {param:g} and --{name.replace('_', '-')} "
                         f"{given[name]:g} disagree; give one")
    return {**given, name: param}


@click.command("resize")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Where to write the resized adapter.")
@rank_rule_options
@kohya_resize_options
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None, help="Override format detection of ADAPTER.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def resize_cmd(adapter, out, rank, energy, sv_ratio, sv_cumulative, min_rank, max_rank, sv_fro, dynamic_method,
               dynamic_param, conv_rank, save_precision, fmt, as_json, overwrite):
    """Truncate every module of ADAPTER to a lower rank (optimal, from the r×r core).

    Alpha is kept; the factors absorb the new scale. The output has the input's format and
    dtype (or --save-precision's); kohya ss_network_dim/alpha metadata follow the new ranks.
    """
    from loratool.lowrank import RankRule
    from loratool.resize import resize_path

    rules = dynamic_rule(dynamic_method, dynamic_param,
                         dict(sv_ratio=sv_ratio, sv_cumulative=sv_cumulative, sv_fro=sv_fro))
    rule = RankRule.from_options(rank, energy, min_rank=min_rank, max_rank=max_rank, **rules)
    report = resize_path(adapter, out, rule, format=fmt, overwrite=overwrite, conv_rank=conv_rank,
                         save_precision=save_precision)
    warn(report.warnings)
    emit(report, as_json, render)
    return 0


def render(r, con=None) -> None:
    """The report as a table that fits ``con`` (default: the terminal's console)."""
    from loratool.cli.render import console, human_count
    from loratool.cli.tables import Column, fitted

    con = con or console()
    cols = [Column("module", flexible=True), Column("kind", drop=2), Column("rank", right=True),
            Column("energy kept", right=True), Column("rel. error", right=True, drop=1), Column("", drop=3)]
    rows = []
    for m in r.modules:
        rank = str(m.old_rank) if m.new_rank == m.old_rank else f"{m.old_rank} → {m.new_rank}"
        rows.append([m.name, m.kind, rank, f"{m.energy_kept:.4%}", f"{m.relative_error:.3e}",
                     "" if m.status == "resized" else m.status])
    con.print(fitted(cols, rows, con.width))
    rule = r.rule + (f"; conv: {r.conv_rule}" if r.conv_rule else "")
    saved = f"; saved as {r.save_precision}" if r.save_precision != "keep" else ""
    con.print(f"{r.num_resized} of {r.num_modules} modules resized ({rule}); parameters "
              f"{human_count(r.old_params)} → {human_count(r.new_params)}; energy kept {r.energy_kept:.4%}; "
              f"max relative error {r.max_relative_error:.3e}; alpha kept{saved}; wrote {r.output}")
