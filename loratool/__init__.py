"""loratool: inspect, validate, convert, resize, compose and merge LoRA adapters.

The command-line program is a thin layer over this library. Import what you need from the
submodules; nothing heavy (torch, triton) is imported by ``import loratool``.
"""

from loratool._version import __version__

__all__ = ["__version__", "load_adapter"]


def load_adapter(path, format=None):
    """Read an adapter (PEFT directory, kohya or diffusers file) lazily. See loratool.formats."""
    from loratool.resolve import load_adapter as _load

    return _load(path, format=format)
