"""Module kinds: the one seam between an adapter's tensors and everything computed from them.

  layout.py  layer types (Linear, Conv1D, Embedding, Conv2d) and every rule about their layouts
  base.py    ``AdapterModule`` (what a kind provides), ``Fit`` (the one fit check against a base
             weight), the registry (``register_kind``, ``module_of``) and tensor-source helpers
  lora.py    LoRA (scale · B @ A, PEFT's lora_B bias)
  dora.py    DoRA (LoRA + a magnitude vector that rescales each output feature when merged)
  lycoris_base.py  what the LyCORIS kinds share (forward-pass scale, DoRA scale, Tucker rebuild)
  loha.py    LoHa (Hadamard product of two low-rank products; exact LoRA of rank r1·r2)
  lokr.py    LoKr (Kronecker product; its SVD is the Kronecker product of the factors' SVDs)
  lycoris_misc.py  LoCon with a Tucker core (lora_mid), the full weight difference
  lycoris_based.py OFT, IA3, GLoRA: deltas that depend on the base weight (``needs_base``)

Merge, parity, validation, inspection, resize and compose go through ``AdapterModule``; format
readers build modules with ``module_of`` (or a kind's class). A new kind is one module here that
registers itself, plus the format readers that map its keys to its tensors.
"""

from loratool.kinds.base import KINDS, AdapterModule, Fit, LowRank, Problem, module_of, register_kind
from loratool.kinds.dora import DoraModule
from loratool.kinds.layout import LayerKind
from loratool.kinds.lora import LoraModule, factor_problem
from loratool.kinds.loha import LohaModule
from loratool.kinds.lokr import LokrModule
from loratool.kinds.lycoris_base import LycorisModule
from loratool.kinds.lycoris_based import GloraModule, Ia3Module, OftModule
from loratool.kinds.lycoris_misc import FullModule, LoconTuckerModule

__all__ = ["KINDS", "AdapterModule", "DoraModule", "Fit", "FullModule", "GloraModule", "Ia3Module", "LayerKind", "LoconTuckerModule",
           "LohaModule", "LokrModule", "LoraModule", "LowRank", "LycorisModule", "OftModule", "Problem", "factor_problem",
           "module_of", "register_kind"]
