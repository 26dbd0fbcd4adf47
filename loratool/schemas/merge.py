"""The results of ``merge``, ``unmerge`` and ``parity`` (their ``--json`` is ``model_dump_json()``;
the JSON Schemas in schemas/ are exported from these classes)."""

from __future__ import annotations

from pydantic import BaseModel, Field

TOLERANCE = "|M - X| <= 1 ulp(X) + float32 accumulation bound; X computed in float64"


class LayerParity(BaseModel):
    name: str
    action: str  # merge | replace
    kind: str | None  # linear | conv1d | conv2d | embedding | bias
    dora: bool = False
    dtype: str
    numel: int
    adapters: list[str]
    max_abs_err: float
    max_ulp_err: float  # |M − X| / ulp(X)
    max_err_over_tol: float  # |M − X| / tolerance: ≤ 1 passes
    bad: int  # elements outside the tolerance
    ok: bool


class ForwardParity(BaseModel):
    model_class: str
    batch: int
    seq_len: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float
    min_top1: float
    ok: bool
    # what the merged model's logits were compared with: the 16-bit base + the adapters through
    # PEFT, or (a merge made with --base-precision, issue 16) the QLoRA model as trained, e.g.
    # "qlora: nf4, blocksize 64, double-quant, via bitsandbytes 0.50.2 + peft 0.18.0"
    reference: str = "16-bit base + adapters unmerged, via peft"
    # where the reference and the merge hold different weights in 4 bits (a Linear weight no
    # adapter changes: 4-bit in the QLoRA model, 16-bit in the merged one; lm_head: the reverse)
    notes: list[str] = []


class LayerDistance(BaseModel):
    """How far one tensor is from another (``unmerge --base``: the result from the original)."""

    name: str
    dtype: str
    numel: int
    differing: int  # elements that are not bit-equal
    max_abs: float
    max_ulp: float  # in ulps of the reference tensor's dtype at the reference value


class ParityReport(BaseModel):
    base: str
    merged: str
    adapters: list[str]
    ok: bool
    tolerance: str = TOLERANCE
    layers: list[LayerParity]  # the touched tensors, in checkpoint order
    untouched: int  # tensors checked for byte (or cast) equality
    untouched_mismatched: list[str] = []
    missing: list[str] = []  # in the base, not in the merged checkpoint
    unexpected: list[str] = []  # in the merged checkpoint, not in the base
    problems: list[str] = []  # shape or dtype disagreements
    max_ulp_err: float = 0.0
    max_err_over_tol: float = 0.0
    forward: ForwardParity | None = None
    # what the merged tensors were checked against: "keep" (base + deltas) or the --base-precision
    # of the merge (dequant(quant(W)) + deltas), from the merged checkpoint's lineage or --base-precision
    base_precision: str = "keep"
    # what the base check could not verify, and the mismatch it allowed: printed on stderr by the
    # CLI, left out of --json (as before issue 12)
    base_warnings: list[str] = Field(default_factory=list, exclude=True)


class QuantLayer(BaseModel):
    """What ``merge --base-precision`` changed in one tensor (issue 16): q = W − dequant(quant(W))."""

    name: str
    numel: int
    base_norm: float  # ‖W‖ (the 16-bit base)
    quant_norm: float  # ‖q‖
    delta_norm: float  # ‖Σ wᵢ·sᵢ·ΔWᵢ‖
    quant_over_delta: float | None  # ‖q‖ / ‖ΔW‖ (None: ΔW = 0)
    relative_change: float  # ‖q‖ / ‖W‖: how far the choice moves the merged weight
    warn: bool  # ‖q‖ > ‖ΔW‖: the precision matters more than the adapter here


class RequantLayer(BaseModel):
    """What ``merge --output-precision`` added to one merged tensor M (issue 16): M − dequant(quant(M))."""

    name: str
    numel: int
    precision: str  # the 4-bit format it is written in: "nf4,blocksize=64,double-quant"...
    requant_norm: float  # ‖M − dequant(quant(M))‖
    delta_norm: float  # ‖Σ wᵢ·sᵢ·ΔWᵢ‖
    requant_over_delta: float | None  # their ratio (None: ΔW = 0)
    warn: bool  # the requantization moves the weight more than the adapter does


class MergeResult(BaseModel):
    """What ``merge``/``unmerge`` wrote."""

    operation: str  # "merge" | "unmerge"
    out: str
    base: str
    adapters: list[str]  # PATH:WEIGHT
    device: str
    dtype: str  # "keep" or the output dtype
    # counts are num_* in every command's JSON (lists and objects keep plain plural names)
    num_tensors: int
    num_merged: int  # tensors changed by LoRA deltas (weights and lora_bias biases)
    num_replaced: int  # modules_to_save (merge) or restored from the base (unmerge)
    num_copied: int  # raw bytes, never decoded
    num_cast: int  # converted to --dtype only
    num_files: int  # safetensors files written
    bytes_written: int
    seconds: float
    warnings: list[str] = []
    # the base the deltas were added to (issue 16): "keep", "nf4,blocksize=64[,double-quant]"...,
    # or "stored:<spec>" for a base stored in 4 bits; per tensor what the choice changed
    base_precision: str = "keep"
    quantization: list[QuantLayer] = []
    # the output's precision (issue 16): "keep" (16-bit), or the 4-bit format the merged weights of
    # a 4-bit base were requantized to, with the error that added per tensor
    output_precision: str = "keep"
    requantization: list[RequantLayer] = []
    # what the base check could not verify, and the mismatch it allowed: printed on stderr by the
    # CLI before ``warnings``, and left out of --json (its output is unchanged since issue 12)
    base_warnings: list[str] = Field(default_factory=list, exclude=True)

    def describe(self) -> str:
        verb = "merged" if self.operation == "merge" else "unmerged"
        parts = [f"{self.num_merged} {verb}"]
        if self.num_replaced:
            parts.append(f"{self.num_replaced} {'replaced' if self.operation == 'merge' else 'restored'}")
        parts.append(f"{self.num_copied} copied raw")
        if self.num_cast:
            parts.append(f"{self.num_cast} cast to {self.dtype}")
        text = (f"wrote {self.out}: {self.num_tensors} tensors ({', '.join(parts)}) in {self.num_files} "
                f"file(s), {self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s on {self.device}")
        if self.base_precision != "keep":
            text += f"; base precision {self.base_precision}"
        if self.output_precision != "keep":
            text += f"; output requantized to {self.output_precision}"
        return text


class UnmergeResult(MergeResult):
    """``unmerge`` output, with the distance to the original base when it was given."""

    distance: list[LayerDistance] = []
    max_ulp: float | None = None
    max_abs: float | None = None
