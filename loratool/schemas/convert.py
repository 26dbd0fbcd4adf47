"""The pydantic model of ``loratool convert``'s result (``--json`` is ``model_dump_json()``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ModuleConversion(BaseModel):
    """One LyCORIS module (LoHa, LoKr, LoCon+Tucker, full) made a plain LoRA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    module: str
    algorithm: str = Field(description="The module's LyCORIS algorithm (loha, lokr, ...)")
    exact_rank: int = Field(description="The rank of its delta: the LoRA rank that holds it exactly")
    rank: int = Field(description="The rank written")
    error: float = Field(description="‖ΔW − ΔW_rank‖_F, from the singular values (0 when exact)")
    relative_error: float = Field(description="error / ‖ΔW‖_F")


class ConvertResult(BaseModel):
    """What ``convert`` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="The adapter as given (a path or a registry/Hub reference)")
    input_format: str = Field(description="The format it was read as: peft, kohya or diffusers")
    format: str = Field(description="The format written")
    output: Path = Field(description="The directory or .safetensors file written")
    num_modules: int
    components: list[str] = Field(default_factory=list,
                                  description="Model parts the adapter targets (unet, text_encoder, ...), if known")
    conversions: list[ModuleConversion] = Field(default_factory=list,
                                                description="LyCORIS modules made plain LoRA, with their errors")

    def describe(self) -> str:
        comps = f" ({', '.join(self.components)})" if self.components else ""
        text = (f"wrote {self.num_modules} modules{comps} as {self.format} to {self.output} "
                f"(from {self.input_format} {self.input})")
        if self.conversions:
            worst = max(self.conversions, key=lambda c: c.relative_error)
            exact = sum(c.rank >= c.exact_rank for c in self.conversions)
            text += (f"\n{len(self.conversions)} LyCORIS modules made LoRA ({exact} at their exact rank); largest "
                     f"relative error {worst.relative_error:.3g} ({worst.module}, {worst.algorithm} rank "
                     f"{worst.exact_rank} -> {worst.rank})")
        return text
