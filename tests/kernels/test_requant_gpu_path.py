"""``merge --base-precision`` on the CUDA path: the executor leaves the round trip to the engine,
whose Triton kernel takes it in its QUANT prologue (``engines._GpuRequant``). Run here with the
kernel in Triton's interpreter on CPU tensors (``TorchEngine(device="cuda", math_device="cpu")``),
against the CPU path (numpy round trip, ``basequant.Requantize``) on the same files (issue 16).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loratool.merge import engines, executor  # noqa: E402
from loratool.merge.api import _merge  # noqa: E402
from tests.tinybase import save_base  # noqa: E402

pytest.importorskip("triton")

H, I = 128, 192  # rows of whole blocks of 64 and 128 (q, v: 128 columns; down_proj: 192)
MODULES = {"self_attn.q_proj": (H, H), "self_attn.v_proj": (H, H), "mlp.down_proj": (H, I)}


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": (torch.randn(64, H, generator=g) * 0.05).to(torch.bfloat16)}
    for i in range(2):
        for m, shape in MODULES.items():
            t[f"model.layers.{i}.{m}.weight"] = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = (torch.randn(I, H, generator=g) * 0.05).to(torch.bfloat16)
    t["model.layers.1.mlp.down_proj.weight"][3, :7] = 0  # zeros, FP4's signed zero codes
    base = save_base(tmp_path / "base", t)
    a = {}
    for i in range(2):
        for m, (rows, cols) in MODULES.items():
            k = f"base_model.model.model.layers.{i}.{m}"
            a[k + ".lora_A.weight"] = torch.randn(8, cols, generator=g) * 0.1
            a[k + ".lora_B.weight"] = torch.randn(rows, 8, generator=g) * 0.01
    return base, _save_adapter(tmp_path / "adapter", a, "LORA", lora_alpha=16)


def _save_adapter(d, tensors, peft_type: str, **config):
    """A PEFT directory of ``tensors`` (rank 8, q/v/down_proj of the tiny Llama)."""
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": peft_type, "r": 8, "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj", "down_proj"],
        "base_model_name_or_path": "tiny-org/tiny-llama", **config}))
    return d


def _within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two bf16 tensors are at most one bf16 ulp (of ``a``'s elements) apart everywhere."""
    ulp = torch.exp2(torch.frexp(a.float().abs())[1].float() - 8)
    return bool(((a.float() - b.float()).abs() <= ulp).all())


@pytest.fixture
def gpu_path(monkeypatch):
    """``gpu_path()`` makes the torch engine run as on CUDA (the kernel's path, the engine taking
    the transform), its tensors on the CPU and the Triton kernel interpreted; it returns the list
    of tensors whose blocks took the GPU round trip, one entry a block."""
    from loratool.kernels import merge as kernels

    calls = []
    real = engines._GpuRequant.merge

    def merge(self, *a, **k):
        calls.append(self.name)
        return real(self, *a, **k)

    def enable():
        monkeypatch.setattr(engines._GpuRequant, "merge", merge)
        monkeypatch.setattr(executor, "TorchEngine", lambda device: engines.TorchEngine("cuda", math_device="cpu"))
        monkeypatch.setattr(kernels, "_use_triton", lambda W: True)
        return calls

    return enable


@pytest.mark.parametrize("precision", ["nf4", "nf4,double-quant", "fp4,blocksize=128"])
def test_the_kernel_path_merges_onto_the_same_base_as_the_cpu_path(tmp_path, files, gpu_path, precision):
    base, adapter = files
    cpu = _merge(base, [str(adapter)], tmp_path / "cpu", engine="torch", base_precision=precision)
    calls = gpu_path()
    gpu = _merge(base, [str(adapter)], tmp_path / "gpu", engine="torch", base_precision=precision, block_bytes=8192)
    bs = 128 if "128" in precision else 64  # down_proj's 192 columns are not whole blocks of 128
    assert sorted(set(calls)) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                           for m, (_, cols) in MODULES.items() if cols % bs == 0)
    assert len(calls) > len(set(calls))  # several row blocks a tensor
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "gpu" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if name == "model.embed_tokens.weight":  # not merged: the base's bytes
            assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
            continue
        # the same base rows (bit-equal round trips, tests/kernels/test_requant_kernel.py; the numpy
        # one for tensors not in ``calls``, then the plain kernel) plus the
        # delta in float32 in another order (torch's addmm, the kernel's tl.dot), rounded once (the
        # interpreter's bf16 store truncates, see test_merge_kernel.py): one bf16 ulp apart at most,
        # where the plain W + ΔW is tens of ulps from the CPU path's
        assert _within_one_ulp(a[name], b[name]), name
    # the report: the same ‖W − dequant(quant(W))‖ / ‖ΔW‖ per tensor
    assert [q.name for q in gpu.quantization] == [q.name for q in cpu.quantization]
    for p, q in zip(cpu.quantization, gpu.quantization):
        assert q.quant_norm == pytest.approx(p.quant_norm, rel=1e-5) and q.quant_norm > 0, p.name
        assert q.base_norm == pytest.approx(p.base_norm, rel=1e-5), p.name


def test_a_layout_the_kernel_does_not_take_goes_through_numpy(tmp_path, files, gpu_path):
    """The embedding (not a merged tensor) and a blocksize the rows are not whole blocks of
    (256 > 128 and 192 columns): the executor's numpy round trip, as on the CPU."""
    base, adapter = files
    cpu = _merge(base, [str(adapter)], tmp_path / "cpu", engine="torch", base_precision="nf4,blocksize=256")
    calls = gpu_path()
    _merge(base, [str(adapter)], tmp_path / "gpu", engine="torch", base_precision="nf4,blocksize=256")
    assert calls == []
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "gpu" / "model.safetensors"))
    for name in a:
        assert _within_one_ulp(a[name], b[name]), name
    assert cpu.quantization


def test_a_base_stored_in_4_bits_is_dequantized_by_the_kernel(tmp_path, files, gpu_path, monkeypatch):
    """A checkpoint as transformers saves a bitsandbytes 4-bit model (every Linear weight packed,
    up_proj untouched by the adapter): the GPU path dequantizes each row block with the kernel
    (kernels/dequant4.py, interpreted), to the CPU path's bits for the untouched weights and
    within one bf16 rounding of its merged ones."""
    F = pytest.importorskip("bitsandbytes.functional")
    base, adapter = files
    src = load_file(str(base / "model.safetensors"))
    q4 = tmp_path / "base4"
    q4.mkdir()
    out = {}
    for name, w in src.items():
        if "embed" in name:
            out[name] = w
            continue
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        out[name] = packed
        out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(out, str(q4 / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (q4 / "config.json").write_text(json.dumps(cfg))

    _merge(q4, [str(adapter)], tmp_path / "cpu", engine="torch")
    gpu_path()
    from loratool.kernels import dequant4

    rows = []
    real = dequant4.dequantize_4bit_triton
    monkeypatch.setattr(dequant4, "dequantize_4bit_triton", lambda *a, **k: rows.append(a[2]) or real(*a, **k))
    _merge(q4, [str(adapter)], tmp_path / "gpu", engine="torch", block_bytes=8192)
    assert len(rows) > 8  # every packed weight, in several row blocks
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "gpu" / "model.safetensors"))
    assert a.keys() == b.keys() == src.keys()
    for name in a:
        if "up_proj" in name or "embed" in name:  # dequantized (or stored bf16) and written: the same bits
            assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
        else:
            assert _within_one_ulp(a[name], b[name]), name


def test_a_kind_without_a_low_rank_form_goes_through_numpy(tmp_path, files, gpu_path):
    """A LoHa adapter with --base-precision on the CUDA path: where a module has no low-rank form
    the kernel takes, the engine leaves the round trip to the executor (numpy) and merges in torch,
    as on the CPU (it stopped on an assertion when the engine claimed the transform first)."""
    base, _ = files
    g = torch.Generator().manual_seed(5)
    a = {}
    for i in range(2):
        for m, (rows, cols) in MODULES.items():
            k = f"base_model.model.model.layers.{i}.{m}"
            for f in ("1", "2"):
                a[k + f".hada_w{f}_a"] = torch.randn(rows, 8, generator=g) * 0.1
                a[k + f".hada_w{f}_b"] = torch.randn(8, cols, generator=g) * 0.1
    loha = _save_adapter(tmp_path / "loha", a, "LOHA", alpha=16)
    _merge(base, [str(loha)], tmp_path / "cpu", engine="torch", base_precision="nf4")
    calls = gpu_path()
    _merge(base, [str(loha)], tmp_path / "gpu", engine="torch", base_precision="nf4")
    merged = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in MODULES}
    assert set(calls) < merged  # some in the kernel (a low-rank form it takes), some not
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "gpu" / "model.safetensors"))
    for name in a:
        if name in calls:  # the kernel's float32 order: one bf16 rounding apart at most
            assert _within_one_ulp(a[name], b[name]), name
        else:  # numpy's round trip, then torch's merge: the CPU path's bits
            assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name


def test_an_infinite_base_element_merges_as_on_the_cpu(tmp_path, files, gpu_path):
    """One +inf in a base weight: its block's round trip is inf/NaN on both paths, and the overflow
    guard compares the merged block with that round trip (not with the finite rest of W), so both
    paths write the same non-finite values instead of one refusing."""
    base, adapter = files
    f = base / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.0.self_attn.q_proj.weight"
    t[name][5, 3] = float("inf")
    save_file(t, str(f), metadata={"format": "pt"})
    _merge(base, [str(adapter)], tmp_path / "cpu", engine="torch", base_precision="nf4")
    calls = gpu_path()
    _merge(base, [str(adapter)], tmp_path / "gpu", engine="torch", base_precision="nf4")
    assert name in calls
    a = load_file(str(tmp_path / "cpu" / "model.safetensors"))[name].float()
    b = load_file(str(tmp_path / "gpu" / "model.safetensors"))[name].float()
    assert not torch.isfinite(a[5]).all()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)) and torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a[torch.isinf(a)], b[torch.isinf(b)])
