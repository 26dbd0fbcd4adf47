"""Pydantic models of the resize and compose reports (``--json`` is ``model_dump_json()``)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class ModuleResize(BaseModel):
    name: str
    kind: str
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    energy_kept: float = Field(description="Share of ‖ΔW‖²_F (sum of σ²) kept by the new rank; 1 for a zero delta")
    relative_error: float = Field(description="‖ΔW − ΔW_k‖_F / ‖ΔW‖_F of the optimal rank-k truncation (0 for a zero delta)")
    numerical_rank: int = Field(description="Numerical rank of the delta (σ above rounding noise)")
    status: str = Field(description="resized | unchanged (rule keeps every component) | kept (asked rank above the current one)")


class ResizeReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str
    output: Optional[str] = None
    format: str
    rule: str = Field(description="The rank rule, e.g. 'rank 8' or 'energy 0.9, max rank 16'")
    conv_rule: Optional[str] = Field(None, description="The rule for Conv2d modules with a kernel above 1x1, when "
                                                       "--conv-rank gives them their own (None: `rule`)")
    save_precision: str = Field("keep", description="Dtype of the output's tensors: fp32, fp16, bf16, or keep "
                                                    "(each tensor its own)")
    alpha_policy: str = Field(description="How alpha and the factors were chosen")
    num_modules: int
    num_resized: int
    old_params: int
    new_params: int
    energy_kept: float = Field(description="Share of the adapter's total energy (Σ over modules of ‖ΔW‖²_F) kept")
    max_relative_error: float
    modules: list[ModuleResize]
    warnings: list[str] = Field(default_factory=list)


class ComposeInput(BaseModel):
    path: str
    weight: float
    format: str
    num_modules: int
    ranks: list[int] = Field(description="Distinct ranks of the adapter's modules")


class ModuleCompose(BaseModel):
    name: str
    kind: str
    inputs: list[int] = Field(description="Indices (into `inputs`) of the adapters that target this module")
    input_ranks: list[int]
    new_rank: int
    energy_kept: Optional[float] = Field(None, description="Share of ‖ΣwΔW‖²_F kept (linear, cat); None where the spectrum is not computed")
    relative_error: float = Field(description="‖M − M_k‖_F / ‖M‖_F, M the exact combination of this module (the weighted sum for linear/cat, the pruned merge for ties/dare/magnitude_prune)")


class ComposeReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[ComposeInput]
    output: Optional[str] = None
    format: str
    method: str
    rule: Optional[str] = Field(None, description="The rank rule (None for cat, which keeps every component)")
    density: Optional[float] = None
    seed: Optional[int] = None
    num_modules: int
    num_params: int
    max_relative_error: float
    modules: list[ModuleCompose]
    warnings: list[str] = Field(default_factory=list)
