"""Cases that once failed, rerun by the fast fuzz test on every `make test` (regression corpus).

A seeded run of a few hundred cases visits each mutation class a handful of times and picks its
variant at random, so a failure that ``make fuzz`` (thousands of runs) finds may not be in it.
Each entry names the case exactly, independently of the schedule: (seed, index, mutation class,
command); ``python -m tests.fuzz --seed S --case I --mutator M --command C --keep DIR`` rebuilds it.
Add the reproducer of every new failure here; keep entries after the fix.
"""

from __future__ import annotations

CORPUS: list[tuple[int, int, str, str]] = [
    # INTERNAL ValueError in adapter.magnitudes: a module whose lora_B / lora_up has 0 rows
    (1, 299, "header.zero_size", "validate_base"),  # kohya
    (2, 670, "header.zero_size", "validate_base"),  # PEFT
    # adapter_config.json is a symlink to a file outside the adapter: read anyway, and its content
    # is printed (inspect), copied into the output (resize) and into the registry store (registry add)
    (1, 48, "config.special", "inspect"),
    (1, 1120, "config.special", "resize"),
    (1, 1321, "config.special", "registry_add"),
    # adapter_model.safetensors is a symlink to a file outside the adapter: read by every command;
    # registry add stores its bytes, convert copies them into the output
    (4, 318, "layout.peft_dir", "registry_add"),
    (9, 2, "layout.peft_dir", "convert_peft"),
    # an adapter path with a byte that is not UTF-8: UnicodeEncodeError printing it (inspect,
    # validate), PydanticSerializationError writing it into JSON (compose's output manifest,
    # inspect --json)
    (5, 3, "path.names", "inspect"),
    (2, 576, "path.names", "validate"),
    (5, 2, "path.names", "compose"),
    (2, 1944, "path.names", "inspect_json"),
    # an -o path with a byte that is not UTF-8: the output is written, then exit 70 printing its
    # name (INTERNAL and PUBLISHED) in merge, resize, convert and compose
    (1, 353, "dest.odd_name.overwrite", "merge"),
    (1, 583, "dest.odd_name", "resize"),
    (1, 1001, "dest.odd_name.overwrite", "convert_peft"),
    (3, 119, "dest.odd_name", "compose"),
    # fixed while the harness was written (merge copied tokenizer.model / generation_config.json
    # through a symlink to a file outside the base): kept as regressions
    (1, 236, "base.symlink_extra", "merge"),
    (1, 1040, "base.symlink_extra", "merge"),
]
