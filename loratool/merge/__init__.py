"""Merge LoRA adapters into a base checkpoint: the plan (what changes, what is copied raw) and a
streaming executor.

    W' = round(W + Σᵢ wᵢ · sᵢ · ΔWᵢ)     ΔWᵢ = Bᵢ @ Aᵢ in the base weight's layout, sᵢ = PEFT's scale

accumulated in float32 and rounded once to the output dtype. The plan is built from headers only;
tensors no adapter touches are copied as raw bytes; the output keeps the base's layout and appears
at OUT only when complete. On the CPU one adapter at weight 1.0 gives PEFT's
``merge_and_unload`` bits.

The modules, each importing only modules listed above it (``tests/test_architecture.py``):

    specs         ``--adapters`` (``AdapterSpec``, ``load_adapters``), ``--dtype``, ``--max-shard-size``
    plan          ``plan_merge``: every base tensor's ``Action`` (copy, cast, merge, replace), the files
    overflow      ``check_overflow`` before writing, and the guard on every written block (issue 11)
    engines       the row-block interface (``BlockEngine``) and ``TorchEngine``: row blocks,
                  ``TensorMath`` (PEFT's arithmetic, through the module kinds' layout), the CUDA
                  kernel, the device
    numpy_engine  ``NumpyEngine``: the plain CPU merge in numpy, with torch's bits and without
                  importing torch
    workers       the I/O threads' queue and stop signal
    reader        base row blocks, read ahead in a thread
    writers       the output writers behind one interface: ``PrefillWriter`` (headers and raw
                  copies while torch imports, then writes at offsets), ``SequentialWriter`` (front
                  to back, O_DIRECT or buffered)
    executor      ``execute``: chooses the engine and the writer, one stream of reads, math and
                  writes, publishes atomically
    parity        ``check_parity``: does a merged checkpoint hold base + deltas; ``tensor_distance``
    api           ``merge`` and ``unmerge``: the base check (``manifest.BaseGuard``), plan, execute, lineage
"""

from __future__ import annotations

from loratool.merge.api import MergeResult, UnmergeResult, merge, unmerge
from loratool.merge.engines import TensorMath, block_rows, resolve_device, row_spans, tensor_spans
from loratool.merge.executor import execute
from loratool.merge.overflow import check_overflow
from loratool.merge.parity import (
    ForwardParity,
    LayerDistance,
    LayerParity,
    ParityReport,
    check_parity,
    forward_parity,
    tensor_distance,
    ulp,
)
from loratool.merge.plan import Action, MergePlan, ShardPlan, TensorPlan, Term, plan_merge
from loratool.merge.specs import (
    AdapterSpec,
    LoadedAdapter,
    load_adapters,
    parse_adapter_specs,
    parse_dtype,
    parse_size,
)

# Internals the tests reach as ``loratool.merge.<name>`` (tests/test_npmerge.py,
# tests/test_overflow.py); not part of the API.
from loratool.merge.engines import _compute_block  # noqa: E402,F401
from loratool.merge.executor import _numpy_plan  # noqa: E402,F401
from loratool.merge.overflow import _check_block  # noqa: E402,F401
from loratool.merge.specs import _specs  # noqa: E402,F401
from loratool.merge.writers import _direct_supported  # noqa: E402,F401

__all__ = [
    "Action",
    "AdapterSpec",
    "ForwardParity",
    "LayerDistance",
    "LayerParity",
    "LoadedAdapter",
    "MergePlan",
    "MergeResult",
    "ParityReport",
    "ShardPlan",
    "TensorMath",
    "TensorPlan",
    "Term",
    "UnmergeResult",
    "block_rows",
    "check_overflow",
    "check_parity",
    "execute",
    "forward_parity",
    "load_adapters",
    "merge",
    "parse_adapter_specs",
    "parse_dtype",
    "parse_size",
    "plan_merge",
    "resolve_device",
    "row_spans",
    "tensor_distance",
    "tensor_spans",
    "ulp",
    "unmerge",
]
