"""`loratool fingerprint` and `loratool manifest`."""

from __future__ import annotations

import click

from loratool.cli.render import FORMAT_CHOICE, emit

BASE_HELP = "A base model: a directory or .safetensors file, or hf://owner/name[@revision]."


@click.command("fingerprint")
@click.argument("base", type=str, metavar="BASE")
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
@click.option("--no-cache", is_flag=True,
              help="Hash every file again instead of using cached hashes (fresh hashes are stored); with "
                   "--source, verify the relation again too.")
@click.option("--source", "source", type=str, default=None, metavar="BASE16",
              help="BASE is a bitsandbytes 4-bit base: verify that it is, bit for bit, the quantization of the "
                   "local 16-bit base BASE16, and record the relation (exit 3 naming the first difference if not).")
def fingerprint_cmd(base, as_json, no_cache, source):
    """Fingerprint BASE: per-file sha256 (the Hub's LFS oid), a structure fingerprint over tensor
    names, shapes and dtypes (headers only), and a content fingerprint over the file hashes.

    With --source BASE16, BASE (a *-bnb-4bit checkpoint) is checked tensor by tensor against
    bitsandbytes' quantize_4bit of BASE16 with the quant config it stores; once verified, the
    fingerprint's derived_from records BASE16's content fingerprint and the quant config, and the
    manifest check accepts an adapter pinned to either base for the other (saying which it saw).

    Hashes are cached under $LORATOOL_HOME (default $XDG_CACHE_HOME/loratool or
    ~/.cache/loratool), keyed by path, size, inode, mtime and ctime (so bytes changed in place are
    hashed again even when the mtime is set back). A Hub base is fingerprinted from the Hub's file
    metadata without downloading weights.
    """
    import time

    from loratool.fingerprint import HashCache, fingerprint_base

    cache = HashCache.default()
    t0 = time.perf_counter()
    recalled = None
    if source is not None:
        from loratool.fingerprint import fingerprint_derived

        fp, recalled = fingerprint_derived(base, source, cache=cache, refresh=no_cache)
    else:
        fp = fingerprint_base(base, cache=cache, refresh=no_cache)
    elapsed = time.perf_counter() - t0
    emit(fp, as_json, lambda r: _render(base, r, cache, elapsed, recalled))
    return 0


def _render(label, fp, cache, elapsed: float, recalled: bool | None = None) -> None:
    from rich.table import Table

    from loratool.cli.render import console, human_bytes, human_count

    con = console()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("base", label)
    if fp.name and fp.name != label:
        t.add_row("name", fp.name)
    if fp.repo_id:
        t.add_row("hub", fp.repo_id + (f" @ {fp.revision}" if fp.revision else ""))
    t.add_row("tensors", "-" if fp.num_tensors is None else
              f"{fp.num_tensors}, {human_count(fp.num_params or 0)} parameters")
    t.add_row("structure", fp.structure or "unknown")
    t.add_row("content", fp.content or "unknown")
    d = fp.derived_from
    if d is not None:
        how = {True: "recorded earlier", False: "verified now"}.get(recalled, "recorded")
        t.add_row("derived from", f"{d.source_name or 'a 16-bit base'} (content {d.source_content}) by "
                  f"{d.base_precision}: {d.quantized_tensors} 4-bit weights bit-equal to quantize_4bit of its "
                  f"weights, {d.copied_tensors} tensors byte-equal; {how} ({d.time})")
    if cache.misses or cache.hits:
        rate = f", {human_bytes(int(cache.hashed_bytes / elapsed))}/s" if cache.hashed_bytes and elapsed > 0 else ""
        t.add_row("hashed", f"{cache.misses} files ({human_bytes(cache.hashed_bytes)}) in {elapsed:.2f} s"
                  f"{rate}; {cache.hits} from cache")
    con.print(t)
    files = Table(box=None, pad_edge=False)
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for f in fp.files:
        sha = f.sha256 or (f"git blob {f.git_blob_id} (not a sha256)" if f.git_blob_id else "unknown")
        files.add_row(f.path, human_bytes(f.size) if f.size is not None else "-", sha)
    con.print(files)
    for note in fp.notes:
        con.print(f"note: {note}")


@click.command("manifest")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--base", "base", type=str, default=None, metavar="BASE", help=BASE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Also print the manifest as JSON.")
@click.option("--no-cache", is_flag=True, help="Hash the base's files again instead of using cached hashes.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None, help="Override format detection of ADAPTER.")
def manifest_cmd(adapter, base, as_json, no_cache, fmt):
    """Write loratool.json beside ADAPTER (<file>.loratool.json for a single file): what the adapter
    is, the fingerprints of its BASE, and its lineage (kept from an existing manifest)."""
    from loratool.fingerprint import HashCache
    from loratool.manifest import record_manifest

    manifest, path = record_manifest(adapter, base=base, cache=HashCache.default(), refresh=no_cache, format=fmt)
    if as_json:
        from loratool.cli.render import print_json

        print_json(manifest)
    else:
        click.echo(f"wrote {path}")
        if manifest.base is None:
            click.echo("note: no --base given: the manifest records no base fingerprint, so commands "
                       "cannot verify the base", err=True)
        else:
            for note in manifest.base.notes:
                click.echo(f"note: {note}", err=True)
    return 0
