"""`loratool validate`."""

from __future__ import annotations

import click

from loratool.cli.render import FORMAT_CHOICE, emit


@click.command("validate")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="Check against this base model (directory or .safetensors).")
@click.option("--target", type=click.Choice(["vllm"]), default=None, help="Also check what this server supports.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Override format detection.")
@click.option("--allow-base-mismatch", is_flag=True,
              help="Report a base that differs from the adapter's manifest as a warning, not exit 3.")
@click.option("--require-manifest", is_flag=True, help="With --base: a missing manifest is an error (exit 3).")
def validate_cmd(adapter, base, target, strict, as_json, fmt, allow_base_mismatch, require_manifest):
    """Check an ADAPTER: structure, config against tensors, values, and fit to a base.

    Exit 0 when clean (warnings allowed unless --strict), 1 when there are findings at error
    level, 2 when the input cannot be read or the usage is wrong, 3 when the base is not the one
    the adapter's manifest records.
    """
    from loratool.validation import validate

    if (allow_base_mismatch or require_manifest) and not base:
        raise click.UsageError("--allow-base-mismatch and --require-manifest need --base")
    report = validate(adapter, base=base, target=target, strict=strict, format=fmt,
                      allow_base_mismatch=allow_base_mismatch, require_manifest=require_manifest)
    emit(report, as_json, render)
    return report.exit_code


def render(r) -> None:
    out = []
    for f in r.findings:
        where = f"{f.file}: " if f.file and f.file not in f.message else ""
        out.append(f"{f.severity.value.upper():7} {f.id} {f.check}: {where}{f.message}")
    verdict = "FAIL" if not r.passed else "ok"
    out.append(f"{verdict}: {r.path}: {r.num_modules} modules, {r.errors} errors, {r.warnings} warnings"
               + (f" (base {r.base})" if r.base else "") + (f" (target {r.target})" if r.target else ""))
    click.echo("\n".join(out))
