"""The pydantic model of ``loratool convert``'s result (``--json`` is ``model_dump_json()``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


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

    def describe(self) -> str:
        comps = f" ({', '.join(self.components)})" if self.components else ""
        return (f"wrote {self.num_modules} modules{comps} as {self.format} to {self.output} "
                f"(from {self.input_format} {self.input})")
