"""Pydantic model of the ``loratool extract`` report (``--json`` is ``model_dump_json()``)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class ExtractedModule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The module (its base tensor's name without '.weight')")
    kind: str = Field(description="linear | embedding | conv1d | conv2d: how PEFT lays out its factors")
    shape: list[int] = Field(description="Shape of the base weight")
    rank: int
    alpha: float = Field(description="Written alpha (= rank: PEFT's scale alpha/rank is 1)")
    relative_error: float = Field(description="‖ΔW − BA‖_F / ‖ΔW‖_F of the written factors before the cast to the "
                                              "output dtype, ΔW = TUNED − BASE, computed on ΔW itself")
    optimal_error: float = Field(description="Estimate of the optimal rank-k error (Eckart–Young) of ΔW: exact for an "
                                             "exact SVD, else extrapolated from the range finder's convergence")
    energy_kept: float = Field(description="1 − relative_error²: the share of ‖ΔW‖²_F kept")
    method: str = Field(description="randomized (range finder + exact small SVD) | exact (LAPACK SVD of ΔW)")
    sketch_size: int = Field(description="Columns of the random sketch (rank + oversampling); 0 for exact")
    num_passes: int = Field(description="Products of ΔW with the sketch (power iterations: (num_passes-2)/2); 0 for "
                                        "exact")
    lora_bias: bool = Field(False, description="Whether its changed bias is written as PEFT's lora_B.bias "
                                               "(TUNED − BASE, --save-dropped lora_bias)")


class DroppedTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The tensor that changed but has no LoRA factors in the output")
    shape: list[int]
    reason: str = Field(description="Why it is not factored: 1-D (norm or bias), too small to factor, ...")
    relative_change: float = Field(description="‖TUNED − BASE‖_F / ‖BASE‖_F of the tensor")
    saved: bool = Field(description="Whether TUNED's tensor is saved whole in the output (modules_to_save)")


class ExtractReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    tuned: str
    output: Optional[str] = None
    format: str
    rule: str = Field(description="The rank rule, e.g. 'rank 16' or 'rel-error 0.01, max rank 64'")
    accuracy: float = Field(description="Requested accuracy of the range finder: relative excess of the error kept "
                                        "over the optimal estimate at which its passes stop")
    seed: int
    dtype: str = Field(description="Dtype of the written factors (fp32, bf16, fp16)")
    compute_dtype: str = Field(description="Dtype the deltas were computed in (float32 or float64)")
    device: str = Field("numpy on the CPU", description="Where the deltas were formed and factored: 'numpy on the "
                                                        "CPU' or 'torch on cuda' (--device)")
    alpha_policy: str
    target_spec: Optional[str] = Field(None, description="--targets as given (None: every 2-D weight that changed)")
    num_tensors: int = Field(description="Tensors compared (every tensor of BASE)")
    num_unchanged: int = Field(description="Target tensors equal in BASE and TUNED (no module written)")
    num_modules: int = Field(description="Modules written as LoRA factors")
    num_dropped: int
    num_params: int = Field(description="Parameters of the written adapter")
    energy_kept: float = Field(description="Share of Σ‖ΔW‖²_F over the factored modules kept by their factors")
    max_relative_error: float
    seconds: float
    modules: list[ExtractedModule]
    dropped: list[DroppedTensor] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
