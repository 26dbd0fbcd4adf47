"""`loratool extract`."""

from __future__ import annotations

import click

from loratool.cli.progress import progress
from loratool.cli.render import FORMAT_CHOICE, emit, warn
from loratool.cli.resize import rank_rule_options
from loratool.formats import COMMON_FORMAT


@click.command("extract")
@click.option("--base", required=True, type=click.Path(path_type=str),
              help="The base checkpoint (a model directory, sharded or not, or one .safetensors file).")
@click.option("--tuned", required=True, type=click.Path(path_type=str),
              help="Its fine-tune, with the same tensors (its shard layout may differ).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Where to write the adapter.")
@rank_rule_options
@click.option("--rel-error", type=float, default=None,
              help="Keep the smallest rank whose relative Frobenius error ‖ΔW − BA‖/‖ΔW‖ is at most this, per module.")
@click.option("--budget", default=None, metavar="SIZE",
              help="A size for all factors together (e.g. 40MB, 1GiB): rank goes where it removes the most error.")
@click.option("--targets", default=None,
              help="Modules to extract: names or dot-suffixes, comma-separated (q_proj,v_proj), or a regular "
                   "expression matching whole module names (PEFT's target_modules). Default: every 2-D weight that "
                   "changed.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=COMMON_FORMAT, show_default=True, help="Output format.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Dtype of the written factors.")
@click.option("--save-dropped", default="none", show_default=True, metavar="none|modules_to_save,lora_bias",
              help="What to do with changed tensors that are not factored (norms, biases, modules too small to "
                   "factor): report them (none), save TUNED's copy whole (modules_to_save), and/or write the bias "
                   "of a module with factors as PEFT's lora_B.bias = TUNED − BASE (lora_bias; PEFT >= 0.14). "
                   "Comma-separated.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where deltas are formed and factored: cuda runs the same range finder with torch on the GPU; "
                   "auto picks cuda when torch sees one, else numpy on the CPU (torch is not imported then).")
@click.option("--accuracy", type=float, default=1e-3, show_default=True,
              help="Relative excess of each module's error over the optimal rank-k error at which the randomized "
                   "range finder stops (sets its oversampling and power iterations).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sketches.")
@click.option("--allow-dtype-mismatch", is_flag=True,
              help="Take the difference of tensors stored in different dtypes in BASE and TUNED (refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (a bar on a terminal, a line every 10 s elsewhere).")
def extract_cmd(base, tuned, out, rank, energy, sv_ratio, sv_cumulative, min_rank, max_rank, rel_error, budget,
                targets, fmt, dtype, save_dropped, device, accuracy, seed, allow_dtype_mismatch, as_json, overwrite, quiet,
                sv_fro=None):
    """Extract a LoRA adapter of BASE from a fine-tune: ΔW = TUNED − BASE, factored module by module.

    Every weight is streamed (one tensor pair at a time) and factored by a seeded randomized SVD;
    the report gives each module's rank and relative error, next to the optimal rank-k error.
    Alpha = rank (scale 1). The output carries a manifest pinned to BASE, whose lineage names TUNED.
    """
    from loratool.errors import UsageError
    from loratool.extract import extract
    from loratool.extract_ranks import ExtractRule
    from loratool.merge.specs import parse_size

    size = None
    if budget is not None:
        try:
            size = parse_size(budget)
        except UsageError:
            raise UsageError(f"--budget: cannot read {budget!r}; expected a size such as 40MB, 1.5GiB or bytes") from None
    rule = ExtractRule.from_options(rank, energy, sv_ratio, rel_error, size, min_rank, max_rank, sv_cumulative,
                                    sv_fro)
    with progress(quiet, "extracting") as advance:
        report = extract(base, tuned, out, rule, targets=targets, format=fmt, dtype=dtype, save_dropped=save_dropped,
                         seed=seed, accuracy=accuracy, overwrite=overwrite, allow_dtype_mismatch=allow_dtype_mismatch,
                         progress=advance, device=device)
    warn(report.warnings)
    emit(report, as_json, render)
    return 0


def render(r, con=None) -> None:
    """Per-module ranks and errors, in a table that fits ``con`` (default: the terminal's)."""
    from loratool.cli.render import console, human_count
    from loratool.cli.tables import Column, fitted

    con = con or console()
    cols = [Column("module", flexible=True), Column("kind", drop=3), Column("shape", drop=2),
            Column("rank", right=True), Column("rel. error", right=True), Column("optimal", right=True, drop=1),
            Column("passes", right=True, drop=4)]
    rows = [[m.name, m.kind, "×".join(map(str, m.shape)), str(m.rank), f"{m.relative_error:.3e}",
             f"{m.optimal_error:.3e}", "exact" if m.method == "exact" else str(m.num_passes)] for m in r.modules]
    con.print(fitted(cols, rows, con.width))
    if r.dropped:
        cols = [Column("dropped tensor", flexible=True), Column("shape", drop=2), Column("change", right=True),
                Column("", drop=1), Column("why", flexible=True, drop=3)]
        rows = [[d.name, "×".join(map(str, d.shape)), f"{d.relative_change:.3e}", "saved" if d.saved else "dropped",
                 d.reason] for d in r.dropped]
        con.print(fitted(cols, rows, con.width))
    ranks = sorted({m.rank for m in r.modules})
    shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}" if ranks else "-"
    biases = sum(m.lora_bias for m in r.modules)
    con.print(f"{r.num_modules} modules extracted ({r.rule}; ranks {shown}"
              f"{f'; {biases} with lora_B.bias' if biases else ''}), {r.num_unchanged} unchanged, "
              f"{r.num_dropped} dropped; {human_count(r.num_params)} parameters ({r.dtype}); energy kept "
              f"{r.energy_kept:.4%}; max relative error {r.max_relative_error:.3e}; alpha = rank; "
              f"{r.seconds:.1f} s; wrote {r.output} ({r.format})")
