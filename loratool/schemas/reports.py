"""Pydantic models of the inspect and validation reports (``--json`` is ``model_dump_json()``)."""

from __future__ import annotations

from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class Spectrum(BaseModel):
    """Singular values of the scaled delta, from the r×r core (never the d×k delta)."""

    singular_values: list[float] = Field(description="Descending singular values of scale·B@A")
    effective_rank_90: int = Field(description="Smallest k holding 90% of the energy (sum of σ²)")
    effective_rank_99: int
    top_energy: float = Field(description="Share of the energy in the top component (0 for a zero delta)")
    frobenius_norm: float


class ModuleReport(BaseModel):
    name: str
    kind: str
    algorithm: str = Field("LoRA", description="LoRA, DoRA, or the LyCORIS algorithm: LoHa, LoKr, LoCon+Tucker, full")
    rank: int
    alpha: float
    scale: float
    a_shape: list[int]
    b_shape: list[int]
    base_shape: list[int] = Field(description="Shape of the base weight the delta is added to")
    dtype: str
    num_params: int
    dora: bool = False
    lora_bias: bool = False
    spectrum: Optional[Spectrum] = None


class InspectReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    format: str
    base_model: Optional[str] = None
    base_revision: Optional[str] = None
    task_type: Optional[str] = None
    components: list[str] = Field(default_factory=list)
    num_modules: int
    targets: list[str] = Field(description="Short target names (last path component)")
    rank: Optional[int] = Field(None, description="The rank when all modules share it")
    rank_counts: dict[str, int] = Field(description="rank -> number of modules with it")
    alpha: Optional[float] = Field(None, description="The alpha when all modules share it")
    alpha_counts: dict[str, int] = Field(description="alpha -> number of modules with it")
    scale: Optional[float] = Field(None, description="The scale when all modules share it")
    use_rslora: bool
    use_dora: bool
    lora_bias: bool
    kinds: dict[str, int]
    algorithms: dict[str, int] = Field(default_factory=dict,
                                       description="Algorithm (LoRA, DoRA, LoHa, LoKr, ...) -> number of modules")
    dtypes: dict[str, int] = Field(description="dtype -> number of tensors")
    num_params: int
    file_size: int = Field(description="Bytes on disk of the adapter's files")
    modules_to_save: list[str] = Field(default_factory=list)
    extra_tensors: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict, description="Short safetensors metadata entries (kohya ss_*)")
    modules: Optional[list[ModuleReport]] = None


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Finding(BaseModel):
    id: str = Field(description="Stable check id, e.g. LT101")
    check: str = Field(description="Stable check name, e.g. ab-rank-mismatch")
    severity: Severity
    message: str
    module: Optional[str] = None
    file: Optional[str] = None


class ValidationReport(BaseModel):
    path: str
    format: Optional[str] = None
    base: Optional[str] = None
    target: Optional[str] = None
    strict: bool = False
    num_modules: int = 0
    num_errors: int
    num_warnings: int
    passed: bool
    exit_code: int
    findings: list[Finding]
    counts: dict[str, int] = Field(default_factory=dict,
                                   description="Check id -> number of findings reported with it")
    ignored: dict[str, int] = Field(default_factory=dict,
                                    description="Check id -> number of findings left out by --ignore")
