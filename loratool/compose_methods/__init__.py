"""Compose methods behind one registry (issues 12 and 14): ``base`` holds the ``ComposeMethod``
base class and the registry; each family is one module (``factor``: linear, cat; ``delta``: ties,
dare_linear, dare_ties, magnitude_prune), registered with ``@register`` when imported below.

To add a method: write its class in a new module here (``@register``, name, PEFT aliases,
rank rules, density, ``compose``), import that module below, and say what it does in the
README's compose paragraph. ``compose_adapters`` and the CLI's ``--method`` find it by name.
"""

from loratool.compose_methods.base import (
    ComposeMethod,
    Composed,
    ComposeOptions,
    Factors,
    get_method,
    method_names,
    methods,
    methods_help,
    module_seed,
    register,
    unregister,
)
from loratool.compose_methods import factor, delta  # noqa: F401,E402  (registers the built-in methods)

__all__ = ["ComposeMethod", "Composed", "ComposeOptions", "Factors", "get_method", "method_names", "methods",
           "methods_help", "module_seed", "register", "unregister"]
