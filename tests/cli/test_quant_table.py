"""The per-tensor tables of merge --base-precision / --output-precision: every tensor with a
warning, the largest ratios of the others, in natural order, and a count of the rest."""

from __future__ import annotations

from types import SimpleNamespace

from loratool.cli.merge import SHOWN, _shown


def _q(layer: int, ratio: float | None, warn: bool = False):
    return SimpleNamespace(name=f"model.layers.{layer}.mlp.down_proj.weight", ratio=ratio, warn=warn)


def test_warnings_and_the_largest_ratios_are_shown_in_natural_order():
    items = [_q(i, 0.1 + i / 100) for i in range(30)]
    items[3] = _q(3, 2.0, warn=True)
    items[25] = _q(25, None, warn=True)  # ΔW = 0: the ratio is infinite
    items[4] = _q(4, None)  # not warned (both zero): sorted among the largest, as inf
    shown, hidden = _shown(items, lambda q: q.ratio)
    names = [q.name for q in shown]
    layers = [int(n.split(".")[2]) for n in names]
    assert layers == sorted(layers)  # layers.2 before layers.10
    assert {3, 25} <= set(layers) and 4 in set(layers)
    rest = sorted((q for q in items if not q.warn and q.ratio is not None), key=lambda q: -q.ratio)
    assert {int(q.name.split(".")[2]) for q in rest[:SHOWN - 1]} <= set(layers)
    assert len(shown) == 2 + SHOWN and hidden == len(items) - len(shown)


def test_a_short_table_is_shown_whole():
    items = [_q(i, 0.5) for i in range(SHOWN)]
    assert _shown(items, lambda q: q.ratio) == (items, 0)

