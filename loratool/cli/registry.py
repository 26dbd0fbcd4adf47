"""`loratool registry`: a local store of adapters with names, versions and tags; the Hub as remote.

Each command reads its arguments, calls one ``loratool.registry`` function and renders the result
(rich for people, ``--json`` for machines).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from loratool.cli.render import FORMAT_CHOICE, emit


def _home(ctx: click.Context):
    return ctx.obj.get("home") if ctx.obj else None


def _registry(ctx: click.Context, create: bool = True):
    from loratool.registry.core import Registry

    return Registry(_home(ctx), create=create)


def _not_made_yet(home: Path) -> bool:
    """Whether the registry's home does not exist yet and could be made (its nearest existing
    ancestor is a folder): a read-only command then shows an empty registry and creates nothing.
    A home that is, or lies under, a file is left to the registry's own one-line error."""
    p = home
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p != home and p.is_dir()


def _short(digest: str) -> str:
    return f"sha256:{digest[:12]}"


@click.group("registry")
@click.option("--home", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Registry location (default: $LORATOOL_HOME, else $XDG_CACHE_HOME/loratool or ~/.cache/loratool).")
@click.pass_context
def registry_group(ctx, home):
    """A local adapter registry: content-addressed blobs under $LORATOOL_HOME with a SQLite index.

    Adapters get names with versions 1, 2, … and movable tags. References, accepted wherever loratool
    takes an adapter: name (latest), name@3, name:prod, sha256:<prefix>, hf://owner/repo[@rev];
    an existing local path always wins.
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home


@registry_group.command("add")
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.option("--name", "name", required=True, help="Registry name (letters, digits, . _ -, '/'-separated parts).")
@click.option("--tag", "tags", multiple=True, help="Point this tag at the new version (repeatable), e.g. prod.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Override format detection of PATH; the registry records it and reads the adapter so.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def add_cmd(ctx, path, name, tags, fmt, as_json):
    """Store the adapter at PATH as the next version of NAME (the same content is stored once)."""
    with _registry(ctx) as reg:
        result = reg.add(path, name, tags=tags, format=fmt)
    _render_add(result, as_json)


def _render_add(result, as_json: bool) -> None:
    emit(result, as_json, _add_lines)


def _add_lines(result) -> None:
    from loratool.cli.render import human_bytes

    tags = f", tagged {', '.join(result.tags)}" if result.tags else ""
    if result.created:
        click.echo(f"added {result.name}@{result.version} ({_short(result.digest)}, "
                   f"{human_bytes(result.new_bytes)} new){tags}")
    else:
        click.echo(f"{result.name}@{result.version} already holds this content ({_short(result.digest)}){tags}")


@registry_group.command("list")
@click.option("--name", "name", default=None, help="Only versions of this name.")
@click.option("--fits", "fits", default=None, metavar="BASE",
              help="Only adapters whose manifest records this base (directory, file or hf://owner/name): "
                   "its content fingerprint, or at least its structure.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
def list_cmd(ctx, name, fits, as_json):
    """List registered adapters, one row per version."""
    from loratool.boundary import default_home
    from loratool.registry.core import Registry
    from loratool.schemas.registry import ListReport

    home = _home(ctx)
    if _not_made_yet(Path(home) if home else default_home()):  # read-only: no registry is an empty one
        report = ListReport(adapters=[])
    else:
        with Registry(home) as reg:
            report = reg.entries(name=name, fits=fits)
    if as_json:
        from loratool.cli.render import print_json

        print_json(report)
        return
    from loratool.cli.render import console, fmt_num, human_bytes
    from loratool.cli.tables import Column, fitted

    con = console()
    if not report.adapters:
        con.print("no adapters" + (" fit that base" if fits else " registered"))
        return
    cols = [Column("adapter"), Column("tags", flexible=True), Column("digest", drop=2), Column("format", drop=4),
            Column("rank", right=True), Column("alpha", right=True, drop=3), Column("targets", flexible=True),
            Column("base", flexible=True), Column("size", right=True), Column("added", drop=5)]
    if fits:
        cols.append(Column("fits"))
    rows = []
    for e in report.adapters:
        tags = ", ".join((["latest"] if e.latest else []) + e.tags)
        base = (e.base.repo_id or e.base.name) if e.base else (e.base_model or "-")
        rows.append([e.ref, tags or "-", _short(e.digest), e.format, ", ".join(map(fmt_num, e.ranks)),
                     ", ".join(map(fmt_num, e.alphas)), ", ".join(e.targets), base or "-", human_bytes(e.size),
                     e.added_at, *([e.fits or "-"] if fits else [])])
    con.print(fitted(cols, rows, con.width))


@registry_group.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the details as JSON.")
@click.pass_context
def show_cmd(ctx, ref, as_json):
    """Show one adapter: versions and tags, files and blobs, base, lineage.

    REF is name (latest version), name@3, name:prod or sha256:<unique digest prefix>."""
    with _registry(ctx, create=False) as reg:
        d = reg.details(ref)
    if as_json:
        from loratool.cli.render import print_json

        print_json(d)
        return
    from loratool.cli.render import console, fmt_num, human_bytes, human_count
    from loratool.cli.tables import Column, fitted

    e = d.entry
    con = console()
    t = _Rows()
    t.add_row("adapter", e.ref + (" (latest)" if e.latest else ""))
    t.add_row("tags", ", ".join(e.tags) or "-")
    t.add_row("digest", f"sha256:{e.digest}")
    if d.same_content:
        t.add_row("same content", ", ".join(d.same_content))
    t.add_row("format", e.format)
    t.add_row("modules", f"{e.num_modules} ({human_count(e.num_params)} parameters)")
    t.add_row("rank / alpha", f"{', '.join(map(fmt_num, e.ranks))} / {', '.join(map(fmt_num, e.alphas))}")
    t.add_row("targets", ", ".join(e.targets) or "-")
    t.add_row("base model", e.base_model or "-")
    if e.base:
        t.add_row("base (manifest)", (e.base.repo_id or e.base.name or "-")
                  + (f" @ {e.base.revision}" if e.base.revision else ""))
        t.add_row("base structure", e.base.structure or "unknown")
        t.add_row("base content", e.base.content or "unknown")
    else:
        t.add_row("base (manifest)", "none recorded" if e.has_manifest else "no manifest")
    src = e.source.location + (f" @ {e.source.revision}" if e.source.revision else "")
    t.add_row("source", ("hf://" if e.source.kind == "hub" else "") + src)
    t.add_row("added", e.added_at)
    t.add_row("tensors digest", d.tensors_digest or "-")
    for edge in d.lineage:
        known = f" = {', '.join(edge.in_registry)}" if edge.in_registry else ""
        t.add_row(f"lineage {edge.step}", f"{edge.operation} from {edge.parent[:12]}…{known}")
    if d.children:
        t.add_row("made into", ", ".join(d.children))
    con.print(fitted([Column("", style="bold"), Column("", flexible=True)], t.rows, con.width, header=False))
    con.print(fitted([Column("file", flexible=True), Column("size", right=True), Column("blob", flexible=True)],
                     [[f.path, human_bytes(f.size), f.sha256] for f in d.files], con.width))


class _Rows:
    """Key/value rows collected for ``fitted`` (values wrap; nothing is cut)."""

    def __init__(self):
        self.rows: list[list[str]] = []

    def add_row(self, key: str, value: str) -> None:
        self.rows.append([key, value])


def _emit(result, as_json: bool, line: str) -> None:
    emit(result, as_json, lambda _: click.echo(line))


@registry_group.command("tag")
@click.argument("ref")
@click.argument("tag")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def tag_cmd(ctx, ref, tag, as_json):
    """Point TAG of the adapter's name at the version REF names (moving prod to an older version is
    a rollback).

    REF is name (latest version), name@3, name:prod or sha256:<unique digest prefix>."""
    with _registry(ctx, create=False) as reg:
        r = reg.tag(ref, tag)
    moved = f" (was @{r.previous})" if r.previous is not None and r.previous != r.version else ""
    _emit(r, as_json, f"{r.name}:{r.tag} -> {r.name}@{r.version}{moved}")


@registry_group.command("untag")
@click.argument("ref", metavar="NAME:TAG")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def untag_cmd(ctx, ref, as_json):
    """Remove the tag NAME:TAG; the version it points at stays."""
    with _registry(ctx, create=False) as reg:
        r = reg.untag(ref)
    _emit(r, as_json, f"removed tag {r.name}:{r.tag} (it pointed at {r.name}@{r.version})")


@registry_group.command("rm")
@click.argument("ref")
@click.option("--all", "all_versions", is_flag=True, help="With a bare NAME: remove every version of it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def rm_cmd(ctx, ref, all_versions, as_json):
    """Remove versions: name@3, name:prod or name:latest that version; sha256:… every version with
    that content; a bare name its only version, or every version with --all (a name with several
    versions is refused without it). Blobs stay until `gc`."""
    with _registry(ctx, create=False) as reg:
        r = reg.remove(ref, all_versions=all_versions)
    _emit(r, as_json, f"removed {', '.join(r.removed)}; run `loratool registry gc` to free their blobs")


@registry_group.command("gc")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def gc_cmd(ctx, as_json):
    """Delete blobs no adapter references, leftovers of interrupted adds, stale materialized copies."""
    from loratool.cli.render import human_bytes

    with _registry(ctx) as reg:
        r = reg.gc()
    emit(r, as_json, lambda r: click.echo(
        f"removed {r.blobs_removed} blobs ({human_bytes(r.bytes_freed)}), {r.temp_files_removed} temporary "
        f"files, {r.materialized_removed} materialized copies"))


@registry_group.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify_cmd(ctx, as_json):
    """Re-hash every blob; exit 1 naming the adapters whose blobs are corrupt or missing."""
    from loratool.cli.render import human_bytes
    from loratool.errors import EXIT_FINDINGS, LoratoolError

    with _registry(ctx) as reg:
        r = reg.verify()
        paths = {c.blob: reg.store.path(c.blob) for c in r.corrupt}

    def lines(r) -> None:
        for c in r.corrupt:
            click.echo(f"{c.problem}: {paths[c.blob]} (held by {', '.join(c.adapters) or 'no named adapter'})")
        click.echo(f"checked {r.blobs_checked} blobs ({human_bytes(r.bytes_checked)}): "
                   + ("ok" if r.ok else f"{len(r.corrupt)} bad"))
        if r.temp_files:
            click.echo(f"note: {r.temp_files} temporary files left by interrupted adds; `gc` removes them")

    emit(r, as_json, lines)
    if not r.ok:
        raise LoratoolError(
            f"registry verify: corrupt or missing blobs in {', '.join(r.bad_adapters) or 'unnamed adapters'}; "
            "delete the bad blob files listed and add those adapters again from their source "
            "(`add` stores missing blobs again)",
            exit_code=EXIT_FINDINGS)


@registry_group.command("export")
@click.argument("ref")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Where to write: a directory (peft, diffusers folders) or a .safetensors file (kohya, diffusers).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Format to write (default: the format it was added in, byte for byte).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def export_cmd(ctx, ref, out, fmt, overwrite, as_json):
    """Write the adapter REF names at OUTPUT: in the format it was added in, its files byte for
    byte (blob digests checked on the way); with --format another, converted.

    REF is name (latest version), name@3, name:prod or sha256:<unique digest prefix>."""
    from loratool.registry.export import export

    r = export(ref, out, format=fmt, overwrite=overwrite, home=_home(ctx))
    _emit(r, as_json, f"wrote {r.output}" + (f" ({r.source_format} converted to {r.format})" if r.converted
                                              else f" ({r.format}, as added)"))


@registry_group.command("pull")
@click.argument("ref", metavar="hf://OWNER/REPO[@REV]")
@click.option("--name", "name", default=None, help="Registry name (default: the repo's name).")
@click.option("--tag", "tags", multiple=True, help="Point this tag at the pulled version (repeatable).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Override format detection of the downloaded adapter, as for `registry add`.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def pull_cmd(ctx, ref, name, tags, fmt, as_json):
    """Download a Hub adapter (its files only, into the Hugging Face cache) and add it."""
    from loratool.registry.hub import pull

    _render_add(pull(ref, name=name, tags=tags, home=_home(ctx), format=fmt), as_json)


@registry_group.command("push")
@click.argument("ref")
@click.argument("repo_id", metavar="OWNER/REPO")
@click.option("--base-model", default=None, metavar="OWNER/NAME",
              help="The Hub model the adapter is for (default: from its manifest, else its config).")
@click.option("--private", is_flag=True, default=None, help="Create the repo private.")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.pass_context
def push_cmd(ctx, ref, repo_id, base_model, private, message):
    """Upload an adapter to a Hub repo in one commit: its files, loratool.json and a model card with
    base_model and base_model_relation: adapter.

    REF is name (latest version), name@3, name:prod or sha256:<unique digest prefix>."""
    from loratool.registry.hub import push

    r = push(ref, repo_id, home=_home(ctx), base_model=base_model, private=private, message=message)
    click.echo(f"pushed {r.ref} to hf://{r.repo_id} ({len(r.files)} files)" + (f": {r.url}" if r.url else ""))
