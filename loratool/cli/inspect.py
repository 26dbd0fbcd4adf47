"""`loratool inspect`."""

from __future__ import annotations

import click

from loratool.cli.render import FORMAT_CHOICE, emit


@click.command("inspect")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--modules", is_flag=True, help="One row per module.")
@click.option("--spectrum", is_flag=True, help="Per-module singular values from the r×r core (implies --modules).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None, help="Override format detection.")
def inspect_cmd(adapter, as_json, modules, spectrum, fmt):
    """Summarise an ADAPTER: format, base, targets, rank, alpha, scale, dtypes, size."""
    from loratool.inspection import inspect_path

    report = inspect_path(adapter, format=fmt, modules=modules, spectrum=spectrum)
    emit(report, as_json, render)
    return 0


def render(r) -> None:
    from rich.table import Table

    from loratool.cli.render import console, fmt_num, human_bytes, human_count

    con = console()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("adapter", r.path)
    t.add_row("format", r.format + (f" ({', '.join(r.components)})" if r.components else ""))
    t.add_row("base model", (r.base_model or "-") + (f" @ {r.base_revision}" if r.base_revision else ""))
    if r.task_type:
        t.add_row("task", r.task_type)
    t.add_row("modules", str(r.num_modules))
    t.add_row("targets", ", ".join(r.targets) or "-")
    t.add_row("kinds", ", ".join(f"{k} ×{v}" for k, v in r.kinds.items()) or "-")
    if set(r.algorithms) - {"LoRA"}:
        t.add_row("algorithms", ", ".join(f"{k} ×{v}" for k, v in r.algorithms.items()))
    t.add_row("rank", fmt_num(r.rank) if r.rank is not None else ", ".join(f"{k} ×{v}" for k, v in r.rank_counts.items()))
    t.add_row("alpha", fmt_num(r.alpha) if r.alpha is not None else ", ".join(f"{k} ×{v}" for k, v in r.alpha_counts.items()))
    t.add_row("scale", fmt_num(r.scale) if r.scale is not None else "varies per module")
    flags = [name for name, on in (("rsLoRA", r.use_rslora), ("DoRA", r.use_dora), ("lora_bias", r.lora_bias)) if on]
    t.add_row("flags", ", ".join(flags) or "-")
    t.add_row("dtypes", ", ".join(f"{k} ×{v}" for k, v in r.dtypes.items()))
    t.add_row("parameters", f"{human_count(r.num_params)} ({r.num_params:,})")
    t.add_row("size", human_bytes(r.file_size))
    if r.modules_to_save:
        t.add_row("modules_to_save", ", ".join(r.modules_to_save))
    if r.extra_tensors:
        t.add_row("other tensors", ", ".join(r.extra_tensors))
    for k in ("ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha"):
        if k in r.metadata:
            t.add_row(k, r.metadata[k])
    con.print(t)
    if r.modules is None:
        return
    from loratool.cli.tables import Column, fitted

    cols = [Column("module", flexible=True), Column("kind", drop=3), Column("rank", right=True),
            Column("alpha", right=True, drop=2), Column("scale", right=True), Column("A", drop=6),
            Column("B", drop=5), Column("dtype", drop=4)]
    spectra = any(m.spectrum for m in r.modules)
    if spectra:  # σ1, then the effective ranks at 90% and 99% of the energy, and the top share
        cols += [Column("σ1", right=True), Column("r90%", right=True), Column("r99%", right=True),
                 Column("top", right=True)]
    rows = []
    from loratool.text import natural_key

    for m in sorted(r.modules, key=lambda m: natural_key(m.name)):
        row = [m.name, m.kind + (f" {m.algorithm}" if m.algorithm != "LoRA" else ""), str(m.rank), fmt_num(m.alpha), f"{m.scale:.4g}",
               "×".join(map(str, m.a_shape)), "×".join(map(str, m.b_shape)), m.dtype]
        if spectra:
            s = m.spectrum
            row += ([f"{s.singular_values[0]:.4g}" if s.singular_values else "-", str(s.effective_rank_90),
                     str(s.effective_rank_99), f"{s.top_energy:.1%}"] if s else ["-"] * 4)
        rows.append(row)
    con.print(fitted(cols, rows, con.width))
    if spectra:
        con.print("σ1: largest singular value of scale·B@A; r90%/r99%: components holding 90%/99% of the "
                  "energy (Σσ²); top: the first component's share")
