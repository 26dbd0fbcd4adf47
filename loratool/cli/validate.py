"""`loratool validate`."""

from __future__ import annotations

import click

from loratool.cli.render import FORMAT_CHOICE, emit


EXAMPLES = 3  # findings shown per check id before "... and N more"


class _ValidateCommand(click.Command):
    def format_epilog(self, ctx, formatter) -> None:
        """The check ids and names, from ``loratool.validation`` (imported only for --help)."""
        from loratool.validation import CHECKS

        with formatter.section("Checks (for --ignore)"):
            formatter.write_dl([(cid, name) for cid, name in CHECKS.items()])


@click.command("validate", cls=_ValidateCommand)
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
@click.option("--ignore", "ignore", multiple=True, metavar="ID",
              help="Leave out the findings of a check (id like LT202 or name like zero-b; repeat or "
                   "comma-separate); they do not count towards the verdict.")
@click.option("--all", "show_all", is_flag=True,
              help="Print every finding (by default a check with many findings shows its first "
                   f"{EXAMPLES} and a count; --json always lists all).")
def validate_cmd(adapter, base, target, strict, as_json, fmt, allow_base_mismatch, require_manifest, ignore,
                 show_all):
    """Check an ADAPTER: structure, config against tensors, values, and fit to a base.

    Exit 0 when clean (warnings allowed unless --strict), 1 when there are findings at error
    level, 2 when the input cannot be read or the usage is wrong, 3 when the base is not the one
    the adapter's manifest records.
    """
    from loratool.errors import LoratoolError
    from loratool.validation import failed_report, validate

    if (allow_base_mismatch or require_manifest) and not base:
        raise click.UsageError("--allow-base-mismatch and --require-manifest need --base")
    try:
        report = validate(adapter, base=base, target=target, strict=strict, format=fmt,
                          allow_base_mismatch=allow_base_mismatch, require_manifest=require_manifest,
                          ignore=ignore)
    except LoratoolError as e:
        if as_json:  # CI parses the same JSON on every exit code; stderr keeps the one line
            emit(failed_report(adapter, e, base=base, target=target, strict=strict), True, None)
        raise
    emit(report, as_json, lambda r: click.echo("\n".join(render_lines(r, None if show_all else EXAMPLES))))
    return report.exit_code



def render_lines(r, examples: int | None = EXAMPLES) -> list[str]:
    """The findings grouped by check id (in the order each id first appears), ``examples`` of each
    then a count of the rest; the verdict last."""
    groups: dict[str, list] = {}
    for f in r.findings:
        groups.setdefault(f.id, []).append(f)
    out = []
    for cid, found in groups.items():
        shown = found if examples is None else found[:examples]
        for f in shown:
            where = f"{f.file}: " if f.file and f.file not in f.message else ""
            out.append(f"{f.severity.value.upper():7} {f.id} {f.check}: {where}{f.message}")
        if len(found) > len(shown):
            out.append(f"{'':7} {cid} {found[0].check}: ... and {len(found) - len(shown)} more like these "
                       f"({len(found)} in all; --all or --json lists them, --ignore {cid} leaves them out)")
    verdict = "FAIL" if not r.passed else "ok"
    ignored = sum(r.ignored.values())
    out.append(f"{verdict}: {r.path}: {r.num_modules} modules, {r.num_errors} errors, {r.num_warnings} warnings"
               + (f", {ignored} ignored ({', '.join(r.ignored)})" if ignored else "")
               + (f" (base {r.base})" if r.base else "") + (f" (target {r.target})" if r.target else ""))
    return out
