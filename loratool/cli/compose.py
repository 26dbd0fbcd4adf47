"""`loratool compose`."""

from __future__ import annotations

import click

from loratool.cli.progress import progress
from loratool.cli.render import FORMAT_CHOICE, emit, warn
from loratool.cli.resize import rank_rule_options
from loratool.compose_methods import get_method, method_names, methods, methods_help


@click.command("compose")
@click.option("--adapters", "specs", required=True, multiple=True, metavar="PATH[:WEIGHT],...",
              help="Adapters and weights, comma-separated (weight 1 when omitted; negative weights allowed). "
                   "The weight is the last ':number' of an entry.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Where to write the composed adapter.")
@click.option("--method", default="linear", show_default=True, metavar="NAME",
              type=click.Choice(method_names()),
              help=methods_help())
@click.option("--density", type=float, default=None,
              help="Share of entries each delta keeps (" + ", ".join(m.name for m in methods() if m.takes_density) + ").")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of " + ", ".join(m.name for m in methods() if m.seeded) + " (masks, randomized SVD).")
@rank_rule_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-different-bases", is_flag=True,
              help="Compose adapters whose configs or manifests record different base models or task types "
                   "(refused otherwise); the override is recorded in the output's lineage.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (a bar on a terminal, a line every 10 s elsewhere).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Override format detection for every input adapter.")
def compose_cmd(specs, out, method, density, seed, rank, energy, sv_ratio, sv_cumulative, sv_fro, min_rank, max_rank,
                as_json, overwrite, allow_different_bases, quiet, fmt):
    """Combine adapters into one: Σ wᵢ·ΔWᵢ per module over the union of their targets.

    The default rank is the largest input rank (every method but cat). The output has scale 1
    (alpha = rank) and the inputs' common format (PEFT when they differ). PEFT's combination_type
    names are accepted for the methods they equal (loratool's linear is PEFT's svd).
    """
    from loratool.adapter_specs import parse_adapter_specs
    from loratool.compose import compose_paths
    from loratool.lowrank import RankRule

    parsed = parse_adapter_specs(specs)
    options = dict(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_cumulative=sv_cumulative, sv_fro=sv_fro,
                   min_rank=min_rank, max_rank=max_rank)
    rule = RankRule.from_options(**options) if any(v is not None for v in options.values()) else None
    with progress(quiet, "composing", unit="modules") as advance:
        # the library reports (modules done, total) once per module; the bar takes increments
        report = compose_paths(parsed, out, method=method, rule=rule, density=density, seed=seed, overwrite=overwrite,
                               allow_different_bases=allow_different_bases, format=fmt,
                               progress=None if advance is None else lambda done, total: advance(1, total))
    warn(report.warnings)
    emit(report, as_json, render)
    return 0


def render(r) -> None:
    from loratool.cli.render import console, fmt_num, human_count
    from loratool.cli.tables import Column, fitted
    from loratool.text import natural_key

    con = console()
    con.print(fitted([Column("#", right=True), Column("adapter", flexible=True), Column("weight", right=True),
                      Column("format", drop=2), Column("modules", right=True), Column("ranks", flexible=True)],
                     [[str(i), a.path, fmt_num(a.weight), a.format, str(a.num_modules), ", ".join(map(str, a.ranks))]
                      for i, a in enumerate(r.inputs)], con.width))
    cols = [Column("module", flexible=True), Column("kind", drop=2), Column("inputs", drop=3),
            Column("ranks in", right=True, drop=1), Column("rank", right=True), Column("energy kept", right=True),
            Column("rel. error", right=True)]
    rows = [[m.name, m.kind, ",".join(map(str, m.inputs)), "+".join(map(str, m.input_ranks)), str(m.new_rank),
             "-" if m.energy_kept is None else f"{m.energy_kept:.4%}", f"{m.relative_error:.3e}"]
            for m in sorted(r.modules, key=lambda m: natural_key(m.name))]
    con.print(fitted(cols, rows, con.width))
    extra = f", density {fmt_num(r.density)}, seed {r.seed}" if r.density is not None else ""
    peft = get_method(r.method).peft_name
    method = f"{r.method} (PEFT's {peft})" if peft and peft != r.method else r.method
    con.print(f"{method}{extra} ({r.rule or 'every component'}): {r.num_modules} modules, "
              f"{human_count(r.num_params)} parameters, max relative error {r.max_relative_error:.3e}; "
              f"wrote {r.output} ({r.format})")
