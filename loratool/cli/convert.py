"""`loratool convert`: write an adapter in another format."""

from __future__ import annotations

import click

from loratool.cli.render import FORMAT_CHOICE, emit
from loratool.formats import REGISTRY

_DIRS = ", ".join(f.name for f in REGISTRY if f.writes_directory)
_FILES = ", ".join(f.name for f in REGISTRY if f.writes_file)


@click.command("convert")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--to", "to", required=True, type=FORMAT_CHOICE, help="Format to write.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help=f"Where to write: a directory ({_DIRS}) or a .safetensors file ({_FILES}).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None, help="Override format detection of ADAPTER.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--rank", type=int, default=None,
              help="LyCORIS modules (LoHa, LoKr, LoCon+Tucker, full; OFT, IA3, GLoRA with --base): keep at "
                   "most this many components (the optimal truncation; exact when the rank allows).")
@click.option("--energy", type=float, default=None,
              help="LyCORIS modules: keep the fewest components holding this share of ‖ΔW‖² (0-1].")
@click.option("--component", default=None, metavar="NAME",
              help="The pipeline component ADAPTER belongs to (unet, text_encoder, transformer, ...), for an "
                   "adapter of one model that PEFT saved: kohya and diffusers name modules by component.")
@click.option("--base", default=None, type=click.Path(path_type=str),
              help="The base checkpoint (a directory, a .safetensors file or hf://owner/name[@rev]) that "
                   "OFT, IA3 and GLoRA modules' ΔW is computed from, so that they become LoRA too; it also says "
                   "which LoHa/LoKr modules are 1×1 convs (SD 1.5's proj_in), which diffusers loads only so.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert_cmd(adapter, to, out, fmt, overwrite, rank, energy, component, base, as_json):
    """Convert ADAPTER (PEFT directory, kohya or diffusers file) to another format.

    Tensors are copied bit for bit; alpha, ranks and kohya's ss_* metadata are kept. What the
    target cannot hold (DoRA in kohya, an LLM adapter in kohya/diffusers) is refused with the reason.
    LyCORIS modules become plain LoRA: exactly where the rank allows, optimally otherwise, with the
    error reported. OFT, IA3 and GLoRA modules need the base (--base) for their ΔW.
    """
    from loratool.convert import convert

    result = convert(adapter, to, out, format=fmt, overwrite=overwrite, rank=rank, energy=energy,
                     component=component, base=base)
    emit(result, as_json, lambda r: click.echo(r.describe()))
    return 0
