"""Issue 14: inspect, validate, resize and compose (linear, cat) of plain LoRA adapters never import
torch; the numpy tensors they write have the bytes torch would have written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from loratool.safetensors_io import HostTensor, SafetensorsFile, bf16_bits, host_tensor, write_safetensors

# Runs one command in a fresh interpreter and fails (exit 9) if torch was imported by then.
RUN = ("import sys\n"
       "from loratool.cli import main\n"
       "try:\n"
       "    main(sys.argv[1:])\n"
       "except SystemExit as e:\n"
       "    assert not e.code, f'exit {e.code}'\n"
       "if 'torch' in sys.modules:\n"
       "    print('torch was imported', file=sys.stderr)\n"
       "    sys.exit(9)\n")


@pytest.mark.parametrize("args", [
    ["inspect", "--spectrum", "{r8}"],
    ["validate", "{bf16}"],
    ["resize", "{bf16}", "--rank", "4", "-o", "{out}"],
    ["compose", "--adapters", "{r8}:0.7,{bias}:0.3", "--rank", "6", "-o", "{out}"],
    ["compose", "--adapters", "{r8}:0.7,{bf16}:-0.3", "--method", "cat", "-o", "{out}"],
], ids=["inspect-spectrum", "validate", "resize", "compose-linear", "compose-cat"])
def test_lora_paths_do_not_import_torch(args, tmp_path, fixtures_dir):
    paths = {"r8": fixtures_dir / "llama_r8", "bf16": fixtures_dir / "llama_r8_bf16",
             "bias": fixtures_dir / "llama_bias", "out": tmp_path / "out"}
    argv = [a.format(**paths) for a in args]
    p = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    if "-o" in argv:
        assert SafetensorsFile(tmp_path / "out" / "adapter_model.safetensors").keys()


def _torch_bits(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return x.to(dtype).view({torch.bfloat16: torch.int16, torch.float16: torch.int16,
                             torch.float32: torch.int32}[dtype]).numpy().view(
        {torch.bfloat16: np.uint16, torch.float16: np.uint16, torch.float32: np.uint32}[dtype])


def _edge_values() -> np.ndarray:
    """float32 values at and around every rounding decision of bfloat16 and float16: exact ties
    (odd and even), one ulp either side, overflow, subnormals, ±0, ±Inf and NaNs."""
    rng = np.random.default_rng(0)
    hi = rng.integers(0, 1 << 16, 4000, dtype=np.uint32) << 16
    ties = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi, hi | 0xFFFF])
    special = np.array([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x80000001, 0x00008000, 0x0, 0x80000000,
                        0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], dtype=np.uint32)
    vals = np.concatenate([ties, special]).view(np.float32)
    noise = rng.standard_normal(4000).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 39, 4000)
    half_ties = (rng.standard_normal(2000) * 100).astype(np.float16).astype(np.float32)
    half_ties = half_ties + np.spacing(half_ties.astype(np.float16)).astype(np.float32) / 2  # float16 ties
    return np.concatenate([vals, noise.astype(np.float32), half_ties, np.float32([65504, 65520, 65519.996])])


def test_bf16_rounding_is_torchs():
    x = _edge_values()
    assert np.array_equal(bf16_bits(x), _torch_bits(torch.from_numpy(x), torch.bfloat16))


@pytest.mark.parametrize("dtype,st", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")])
def test_host_tensor_rounds_float64_like_torch(dtype, st):
    """float64 values (what resize and compose compute) go through float32 as torch's casts do."""
    rng = np.random.default_rng(1)
    x32 = _edge_values()
    x32 = x32[np.isfinite(x32)]  # float16's NaN payloads differ between numpy and torch; factors are finite
    # float64 values just past a float32 tie: one rounding to half precision differs from two
    x64 = np.concatenate([x32.astype(np.float64) * (1 + 2.0 ** -30), rng.standard_normal(3000) * 3.0,
                          x32.astype(np.float64)])
    got = host_tensor(x64.reshape(-1, 2) if x64.size % 2 == 0 else x64, st)
    want = _torch_bits(torch.from_numpy(x64), dtype)
    assert got.dtype == st and np.array_equal(got.array.reshape(-1).view(want.dtype), want)
    assert torch.equal(got.load().reshape(-1).view(torch.uint8), torch.from_numpy(x64).to(dtype).view(torch.uint8))


def test_written_bytes_match_torch_tensors(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3))
    numpy_items = [("a", host_tensor(x, "BF16")), ("b", host_tensor(x, "F16")), ("c", x.astype(np.float32)),
                   ("d", HostTensor("F64", x).reshape(3, 5)), ("s", host_tensor(2.5, "BF16"))]
    t = torch.from_numpy(x)
    torch_items = [("a", t.to(torch.bfloat16)), ("b", t.to(torch.float16)), ("c", t.float()),
                   ("d", t.reshape(3, 5)), ("s", torch.tensor(2.5, dtype=torch.bfloat16))]
    write_safetensors(tmp_path / "np.safetensors", numpy_items, {"k": "v"})
    write_safetensors(tmp_path / "pt.safetensors", torch_items, {"k": "v"})
    assert (tmp_path / "np.safetensors").read_bytes() == (tmp_path / "pt.safetensors").read_bytes()
