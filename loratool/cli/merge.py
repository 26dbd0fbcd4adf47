"""`loratool merge`, `loratool parity` and `loratool unmerge`: adapters into base checkpoints."""

from __future__ import annotations

import os

import click

from loratool.cli.progress import progress
from loratool.cli.render import FORMAT_CHOICE, emit, warn

ADAPTERS_HELP = ("Adapters as PATH[:WEIGHT], comma-separated or repeated (the weight is the last "
                 ":number, default 1.0), e.g. a:0.7,b:0.3.")
DTYPE_CHOICE = click.Choice(["keep", "bf16", "fp16", "fp32"])
DEVICE_CHOICE = click.Choice(["auto", "cpu", "cuda"])


BASE_OPTIONS = [
    click.option("--allow-base-mismatch", is_flag=True,
                 help="Go on when the base is not the one an adapter's manifest records (recorded in the "
                      "output's lineage)."),
    click.option("--require-manifest", is_flag=True,
                 help="Refuse adapters without a manifest recording their base (exit 3)."),
]


def base_options(f):
    for opt in reversed(BASE_OPTIONS):
        f = opt(f)
    return f


def _engine_options() -> dict:
    """How the merge computes and writes, from the environment (for benchmarks and bug reports):
    ``LORATOOL_MERGE_ENGINE=torch`` takes torch for every tensor, ``LORATOOL_DIRECT_IO=0``
    writes through the page cache instead of O_DIRECT."""
    return {"engine": "torch" if os.environ.get("LORATOOL_MERGE_ENGINE", "").lower() == "torch" else "auto",
            "direct_io": False if os.environ.get("LORATOOL_DIRECT_IO", "1") == "0" else None}


def _report(result, as_json: bool) -> None:
    emit(result, as_json, lambda r: click.echo(r.describe()))


@click.command("merge")
@click.option("--base", required=True, type=click.Path(path_type=str),
              help="Base model directory (one or many safetensors shards) or one .safetensors file.")
@click.option("--adapters", "adapters", required=True, multiple=True, help=ADAPTERS_HELP)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Output directory (a file when BASE is a file); written atomically.")
@click.option("--dtype", type=DTYPE_CHOICE, default="keep", show_default=True,
              help="Output dtype of floating-point tensors.")
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True,
              help="Where the math runs: the CPU (PEFT's arithmetic, bit for bit) or CUDA (Triton).")
@click.option("--max-shard-size", default=None, help="Re-shard the output (e.g. 5GB); default: keep the base's shards.")
@click.option("--base-precision", default="keep", show_default=True, metavar="keep|nf4|fp4[,blocksize=N][,double-quant]",
              help="Merge onto bitsandbytes' dequant(quant(W)) of each changed Linear weight, the base a QLoRA "
                   "adapter was trained against (bit for bit), and report per tensor how much that changes.")
@click.option("--output-precision", default="keep", show_default=True,
              metavar="keep|stored|nf4|fp4[,blocksize=N][,double-quant]",
              help="With a base stored in 4 bits: write the merged weights requantized to 4 bits (bitsandbytes' "
                   "bits, transformers' serialization; 'stored': as the base held each), the untouched ones as "
                   "stored, and report per tensor the error that adds next to the adapter's delta.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (a bar on a terminal, a line every 10 s elsewhere).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Override format detection for every adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@base_options
def merge_cmd(base, adapters, out, dtype, device, max_shard_size, base_precision, output_precision, overwrite, quiet,
              fmt, as_json, allow_base_mismatch, require_manifest):
    """Merge adapters into BASE: W + Σ wᵢ·sᵢ·ΔWᵢ, rounded once.

    The output keeps BASE's shard layout, index, metadata, config and tokenizer files; tensors no
    adapter touches are copied as raw bytes. On the CPU one adapter with weight 1.0 follows PEFT's
    float32 arithmetic and gives exactly merge_and_unload's bits; weighted merges accumulate in
    float64. A base other than the one an adapter's manifest records is refused (exit 3). A base
    saved in 4 bits by bitsandbytes is dequantized as stored and written in 16 bits (or, with
    --output-precision, its merged weights requantized to 4 bits).
    """
    from loratool.merge import merge

    with progress(quiet, "merging") as cb:
        result = merge(base, list(adapters), out, dtype=dtype, device=device, max_shard_size=max_shard_size,
                       overwrite=overwrite, progress=cb, allow_base_mismatch=allow_base_mismatch,
                       require_manifest=require_manifest, base_precision=base_precision, format=fmt,
                       output_precision=output_precision, **_engine_options())
    warn(result.base_warnings)
    warn(result.warnings)
    if result.quantization and not as_json:
        _render_quantization(result)
    if result.requantization and not as_json:
        _render_requantization(result)
    _report(result, as_json)
    return 0


SHOWN = 12  # rows of a per-tensor table beyond those with a warning: the largest ratios


def _shown(items: list, ratio) -> tuple[list, int]:
    """The rows of a per-tensor table: every one with a warning, and the SHOWN largest ``ratio``
    of the others, in natural name order; and how many are left out (``--json`` lists all)."""
    from loratool.text import natural_key

    if len(items) > SHOWN:
        rest = sorted((q for q in items if not q.warn), key=lambda q: -(ratio(q) if ratio(q) is not None else 1e300))
        keep = {id(q) for q in items if q.warn} | {id(q) for q in rest[:SHOWN]}
    else:
        keep = {id(q) for q in items}
    shown = sorted((q for q in items if id(q) in keep), key=lambda q: natural_key(q.name))
    return shown, len(items) - len(shown)


def _render_quantization(result) -> None:
    """The per-tensor table of ``--base-precision``: what the quantization term is next to the delta
    (the tensors where it is the larger, and the largest ratios of the others)."""
    from loratool.cli.render import console
    from loratool.cli.tables import Column, fitted

    con = console()
    cols = [Column("tensor", flexible=True), Column("‖W‖", right=True, drop=2), Column("‖q‖", right=True),
            Column("‖ΔW‖", right=True), Column("‖q‖/‖ΔW‖", right=True), Column("‖q‖/‖W‖", right=True, drop=1),
            Column("")]
    shown, hidden = _shown(result.quantization, lambda q: q.quant_over_delta)
    rows = [[q.name, f"{q.base_norm:.4g}", f"{q.quant_norm:.4g}", f"{q.delta_norm:.4g}",
             f"{q.quant_over_delta:.3g}" if q.quant_over_delta is not None else "inf", f"{q.relative_change:.3%}",
             "[yellow]q > ΔW[/yellow]" if q.warn else ""] for q in shown]
    con.print(fitted(cols, rows, con.width))
    if hidden:
        con.print(f"({hidden} more tensors with smaller ‖q‖/‖ΔW‖; --json lists every tensor)")
    con.print(f"q = W − dequant(quant(W)) at {result.base_precision}; ‖q‖/‖W‖ is how far the choice moves "
              "the merged weight")


def _render_requantization(result) -> None:
    """The per-tensor table of ``--output-precision``: the requantization error next to the delta."""
    from loratool.cli.render import console
    from loratool.cli.tables import Column, fitted

    con = console()
    cols = [Column("tensor", flexible=True), Column("format", drop=1), Column("‖M − dq(q(M))‖", right=True),
            Column("‖ΔW‖", right=True), Column("ratio", right=True), Column("")]
    shown, hidden = _shown(result.requantization, lambda q: q.requant_over_delta)
    rows = [[q.name, q.precision, f"{q.requant_norm:.4g}", f"{q.delta_norm:.4g}",
             f"{q.requant_over_delta:.3g}" if q.requant_over_delta is not None else "inf",
             "[yellow]> ΔW[/yellow]" if q.warn else ""] for q in shown]
    con.print(fitted(cols, rows, con.width))
    if hidden:
        con.print(f"({hidden} more tensors with smaller ratios; --json lists every tensor)")
    con.print(f"M = the merged 16-bit weight, written in {result.output_precision}; ratio = "
              "‖M − dequant(quant(M))‖ / ‖ΔW‖, the error the 4-bit output adds next to the adapter's delta")


@click.command("unmerge")
@click.option("--merged", required=True, type=click.Path(path_type=str), help="The merged checkpoint.")
@click.option("--adapters", "adapters", required=True, multiple=True, help=ADAPTERS_HELP)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output directory.")
@click.option("--base", default=None, type=click.Path(path_type=str),
              help="The original base: modules_to_save are restored from it, and the result is compared with it.")
@click.option("--dtype", type=DTYPE_CHOICE, default="keep", show_default=True)
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (a bar on a terminal, a line every 10 s elsewhere).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Override format detection for every adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def unmerge_cmd(merged, adapters, out, base, dtype, device, overwrite, quiet, fmt, as_json):
    """Subtract adapters from a merged checkpoint: round(M − Σ wᵢ·sᵢ·ΔWᵢ).

    The merge rounded once, so the result is within about one ulp of the original base, not
    equal to it. DoRA adapters are refused (their per-row rescaling cannot be undone).
    """
    from loratool.merge import unmerge

    with progress(quiet, "unmerging") as cb:
        result = unmerge(merged, list(adapters), out, base=base, dtype=dtype, device=device,
                         overwrite=overwrite, progress=cb, format=fmt, **_engine_options())
    warn(result.warnings)
    _report(result, as_json)
    if not as_json and result.distance:
        worst = max(result.distance, key=lambda d: d.max_ulp)
        differing = sum(d.differing for d in result.distance)
        numel = sum(d.numel for d in result.distance)
        click.echo(f"distance to {base}: {differing} of {numel} elements differ ({differing / max(1, numel):.2%}); "
                   f"max {result.max_ulp:.2f} ulp ({worst.name}), max abs {result.max_abs:.3g}")
    return 0


@click.command("parity")
@click.option("--base", required=True, type=click.Path(path_type=str),
              help="The base checkpoint: a directory, a .safetensors file or hf://owner/name[@rev].")
@click.option("--merged", required=True, type=click.Path(path_type=str), help="The merged checkpoint to check.")
@click.option("--adapters", "adapters", required=True, multiple=True, help=ADAPTERS_HELP)
@click.option("--forward", is_flag=True,
              help="Also compare logits: PEFT with the adapters unmerged against the merged model (transformers).")
@click.option("--min-top1", type=float, default=0.95, show_default=True,
              help="With --forward: the share of positions whose top-1 token must agree.")
@click.option("--base-precision", default=None, metavar="keep|nf4|fp4[,blocksize=N][,double-quant]",
              help="What MERGED's deltas were added to (default: what its loratool.json lineage records, else "
                   "keep). A 4-bit spec checks round(dequant(quant(W)) + ΔW), and --forward compares with the "
                   "QLoRA model as trained: the base's Linears in 4 bits (bitsandbytes when installed) + PEFT.")
@click.option("--all", "show_all", is_flag=True, help="List every checked tensor, not only failures and the worst.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (a bar on a terminal, a line every 10 s elsewhere).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Override format detection for every adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@base_options
def parity_cmd(base, merged, adapters, forward, min_top1, base_precision, show_all, quiet, fmt, as_json,
               allow_base_mismatch, require_manifest):
    """Check that MERGED equals BASE plus the adapters' deltas within one rounding, layer by layer.

    Exit 0 when every tensor passes, 1 when one does not.
    """
    from loratool.merge import check_parity

    with progress(quiet, "checking") as cb:
        report = check_parity(base, merged, list(adapters), forward=forward, min_top1=min_top1, progress=cb,
                              allow_base_mismatch=allow_base_mismatch, require_manifest=require_manifest,
                              format=fmt, base_precision=base_precision)
    warn(report.base_warnings)
    emit(report, as_json, lambda r: _render_parity(r, show_all))
    return 0 if report.ok else 1


def _render_parity(r, show_all: bool) -> None:
    from loratool.cli.render import console
    from loratool.cli.tables import Column, fitted

    con = console()
    worst = sorted(r.layers, key=lambda lay: -lay.max_err_over_tol)
    layers = r.layers if show_all else ([lay for lay in worst if not lay.ok] or worst[:10])
    if layers:
        cols = [Column("tensor", flexible=True), Column("kind", drop=2), Column("dtype", drop=1),
                Column("max abs err", right=True), Column("max err (ulp)", right=True), Column("err/tol", right=True),
                Column("bad", right=True), Column("")]
        rows = [[lay.name, (lay.kind or lay.action) + (" dora" if lay.dora else ""), lay.dtype, f"{lay.max_abs_err:.3g}",
                 f"{lay.max_ulp_err:.3g}", f"{lay.max_err_over_tol:.3f}", str(lay.bad),
                 "ok" if lay.ok else "[red]FAIL[/red]"] for lay in layers]
        con.print(fitted(cols, rows, con.width))
        con.print("tolerance: 1 ulp of the float64 value X plus the float32 accumulation bound "
                  "(err/tol ≤ 1 passes; ulps of X grow where W and ΔW cancel)")
        if not show_all and len(layers) < len(r.layers):
            con.print(f"({len(r.layers) - len(layers)} more passing tensors; --all lists them)")
    for name in r.untouched_mismatched[:10]:
        con.print(f"[red]FAIL[/red] untouched tensor {name} differs from the base")
    for name in r.missing[:10]:
        con.print(f"[red]FAIL[/red] {name} is missing from {r.merged}")
    for name in r.unexpected[:10]:
        con.print(f"[red]FAIL[/red] {name} is in {r.merged} but not in the base")
    for p in r.problems[:10]:
        con.print(f"[red]FAIL[/red] {p}")
    if r.forward is not None:
        f = r.forward
        con.print(f"forward ({f.model_class}, {f.batch}×{f.seq_len} tokens) against {f.reference}: "
                  f"max |Δlogit| {f.max_abs_diff:.3g} (max |logit| {f.max_abs_logit:.3g}), top-1 agreement "
                  f"{f.top1_agreement:.2%} (need {f.min_top1:.0%}): {'ok' if f.ok else 'FAIL'}")
        for note in f.notes:
            con.print(f"[yellow]note[/yellow] {note}")
    merged_ok = sum(1 for lay in r.layers if lay.ok)
    verdict = "PASS" if r.ok else "FAIL"
    onto = "" if r.base_precision == "keep" else f" of dequant(quant(W)) at {r.base_precision} + ΔW"
    con.print(f"{verdict}: {merged_ok} of {len(r.layers)} changed tensors within one rounding{onto} "
              f"(max err/tol {r.max_err_over_tol:.3f}); {r.untouched - len(r.untouched_mismatched)} of {r.untouched} "
              "untouched tensors identical to the base")
