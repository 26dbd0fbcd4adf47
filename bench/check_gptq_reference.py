"""loratool.quant.gptq against the reference implementations' own packing and dequantization.

The references are fetched with ``pip download --no-deps`` (AutoAWQ 0.2.9, GPTQModel 7.7.0,
AutoGPTQ 0.7.1) into --refs (default /tmp/loratool-gptq-refs) and their pure-torch modules are
loaded from the unpacked files, with small stand-ins for the packages' unrelated imports (logging
bars, device probes): nothing is installed into the project's venv. For each case, a layer of
chosen codes, zero points and scales is packed by a reference's own pack function, saved with
safetensors, read back by ``gptq.group`` and compared bit for bit (codes, and the dequantized
weight) with the reference's dequantization.

    .venv/bin/python bench/check_gptq_reference.py            # writes bench/results/gptq_reference.txt
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PINS = ("autoawq==0.2.9", "gptqmodel==7.7.0", "auto-gptq==0.7.1")


def fetch(refs: Path) -> dict[str, Path]:
    """The unpacked source trees of the pinned references (downloaded once)."""
    dl, src = refs / "dl", refs / "src"
    if not dl.exists() or len(list(dl.iterdir())) < len(PINS):
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), *PINS], check=True)
    src.mkdir(parents=True, exist_ok=True)
    for f in dl.iterdir():
        if (src / (f.name + ".done")).exists():
            continue
        if f.suffix == ".whl":
            with zipfile.ZipFile(f) as z:
                z.extractall(src / "autogptq")
        else:
            with tarfile.open(f) as t:
                t.extractall(src, filter="data")
        (src / (f.name + ".done")).touch()
    return {"awq": src / "autoawq-0.2.9", "gptqmodel": src / "gptqmodel-7.7.0", "autogptq": src / "autogptq"}


class _Anything(types.ModuleType):
    """A stand-in module: every attribute is a callable that returns another stand-in."""

    def __getattr__(self, k):
        if k.startswith("__"):
            raise AttributeError(k)
        return _Dummy()


class _Dummy:
    def __call__(self, *a, **k):
        return _Dummy()

    def __getattr__(self, k):
        return _Dummy()


def _package(name: str, path: Path, **attrs) -> None:
    """``name`` as a package whose submodules load from ``path``, without running its __init__."""
    m = types.ModuleType(name)
    m.__path__ = [str(path)]
    m.__dict__.update(attrs)
    sys.modules[name] = m


def load(trees: dict[str, Path]) -> types.SimpleNamespace:
    os.environ["GPTQMODEL_DISABLE_PACK_EXT"] = "1"  # GPTQModel's own Python packing path
    os.environ["GPTQ_TORCH_TRITON_DEQUANT"] = "0"
    for miss in ("logbar", "threadpoolctl", "device_smi"):
        if importlib.util.find_spec(miss) is None:
            sys.modules[miss] = _Anything(miss)
    if importlib.util.find_spec("pcre") is None:  # GPTQModel's regex engine: re under its names
        pcre = types.ModuleType("pcre")
        pcre.__dict__.update({k: v for k, v in vars(re).items() if not k.startswith("__")}, Flag=re.RegexFlag)
        sys.modules["pcre"] = pcre
    gm = trees["gptqmodel"] / "gptqmodel"
    _package("gptqmodel", gm, DEBUG_ON=False)
    for sub in ("nn_modules", "models", "adapter"):
        _package(f"gptqmodel.{sub}", gm / sub)
    aw = trees["awq"] / "awq"
    _package("awq", aw)
    for sub in ("utils", "modules", "modules/linear"):
        _package("awq." + sub.replace("/", "."), aw / sub)
    spec = importlib.util.spec_from_file_location(
        "autogptq_cuda_old", trees["autogptq"] / "auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py")
    cuda_old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_old)
    spec = importlib.util.spec_from_file_location(
        "autogptq_cuda", trees["autogptq"] / "auto_gptq/nn_modules/qlinear/qlinear_cuda.py")
    cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda)
    return types.SimpleNamespace(
        awq_pack=importlib.import_module("awq.utils.packing_utils"),
        awq_gemm=importlib.import_module("awq.modules.linear.gemm"),
        gm_torch=importlib.import_module("gptqmodel.nn_modules.qlinear.torch"),
        gm_model=importlib.import_module("gptqmodel.utils.model"),
        gm_dequant=importlib.import_module("gptqmodel.utils.model_dequant"),
        gm_awq=importlib.import_module("gptqmodel.quantization.awq.utils.packing_utils"),
        ag_cuda_old=cuda_old, ag_cuda=cuda)


# -- helpers ---------------------------------------------------------------------------------------

def layer(tmp: Path, tensors: dict, qconfig: dict, dtype=None, name="layer"):
    """The ``PackedRef`` of ``layer.weight`` after saving ``tensors`` (layer.qweight...)."""
    from safetensors.torch import save_file

    from loratool.quant import gptq
    from loratool.safetensors_io import SafetensorsFile

    path = tmp / f"{name}.safetensors"
    save_file({f"layer.{k}": v.contiguous() for k, v in tensors.items()}, str(path))
    st = SafetensorsFile(path)
    refs = {k: st.ref(k) for k in st.keys()}
    out, found = gptq.group(refs, qconfig, dtype)
    assert found == ["layer.weight"], found
    return out["layer.weight"], path


def same(ref, ours_raw, name: str, results: list, note: str = "", differs: bool = False) -> bool:
    """Whether the reference's [in, out] float tensor, transposed, has our bits; ``differs``: a
    known disagreement between references, recorded as EXPECTED (DIFF if it does not differ)."""
    import numpy as np
    import torch

    want = ref.detach().t().contiguous()
    bits = want.view(torch.int16).numpy() if want.dtype in (torch.float16, torch.bfloat16) else \
        want.view(torch.int32).numpy()
    got = np.asarray(ours_raw).view(bits.dtype).reshape(bits.shape)
    diff = int(np.count_nonzero(bits != got))
    status = ("EXPECTED" if diff else "DIFF") if differs else ("OK  " if diff == 0 else "DIFF")
    results.append(f"{status} {name}: {diff} of {bits.size} values differ{note}")
    return diff == 0


def gptq_codes(bits, in_f, out_f, group, desc_act, sym, seed, zero_floor=1):
    """Random codes, zero points (>= zero_floor: no v1 all-ones field unless 0), fp16 scales."""
    import torch

    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    groups = in_f // group
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=g)
    z = torch.full((out_f, groups), 1 << (bits - 1)) if sym else torch.randint(zero_floor, maxq + 1, (out_f, groups),
                                                                                  generator=g)
    s = (torch.rand(out_f, groups, generator=g) * 0.02 + 1e-3).half().float()
    g_idx = (torch.randperm(in_f, generator=g) if desc_act else torch.arange(in_f)) // group
    w = (q - z[:, g_idx]).float() * s[:, g_idx]  # exact: the packer's round() gives q back
    return q, z, s, g_idx.int(), w


# -- cases -----------------------------------------------------------------------------------------

def gptqmodel_cases(R, tmp: Path, results: list) -> None:
    import numpy as np
    import torch

    from loratool.quant import gptq

    in_f, out_f = 256, 96
    for bits in (2, 3, 4, 8):
        for group, desc_act, sym in ((32, False, True), (64, True, False), (256, False, False), (32, True, True)):
            for zero_floor in ((1, 0) if not sym else (1,)):
                q, z, s, g_idx, w = gptq_codes(bits, in_f, out_f, group, desc_act, sym, seed=bits * 100 + group,
                                               zero_floor=zero_floor)
                lin = torch.nn.Linear(in_f, out_f, bias=False)
                lin.weight.data = w
                m = R.gm_torch.TorchLinear(bits=bits, group_size=group, sym=sym, desc_act=desc_act, in_features=in_f,
                                           out_features=out_f, bias=False, pack_dtype=torch.int32)
                m.pack_block(lin, s, z, g_idx)
                m.eval()
                tag = f"gptq bits={bits} group={group} desc_act={desc_act} sym={sym}" + \
                    (" zero points include 0" if zero_floor == 0 else "")
                # v2: GPTQModel's packing read back; our codes and GPTQModel's TorchLinear dequantization
                t = {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales, "g_idx": m.g_idx}
                qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
                      "checkpoint_format": "gptq_v2"}
                ref, path = layer(tmp, t, qc, name="v2")
                p = ref.arrays()
                codes = gptq.fields(p.qweight, np.arange(in_f), bits, axis=0)
                results.append(f"{'OK  ' if np.array_equal(codes.T, q.numpy()) else 'DIFF'} {tag} v2: codes "
                               "unpacked = codes packed by GPTQModel pack_block")
                same(m.dequantize_weight(), ref.dequantized(), f"{tag} v2 vs GPTQModel TorchLinear.dequantize_weight",
                     results)
                blocks = np.concatenate([ref.dequantized(a, b - a, p) for a, b in ((0, 7), (7, 40), (40, out_f))])
                results.append(f"{'OK  ' if np.array_equal(blocks, ref.dequantized()) else 'DIFF'} {tag} v2: row blocks "
                               "[0,7) [7,40) [40,96) = the whole")
                for dt in (torch.float16, torch.bfloat16):
                    conv = R.gm_dequant.convert_gptq_file(path, dt, qc, "cpu")["layer.weight"]
                    ref_dt, _ = layer(tmp, t, qc, dtype=str(dt), name="v2dt")
                    same(conv.t(), ref_dt.dequantized(), f"{tag} v2 {dt} vs GPTQModel convert_gptq_file", results)
                # v1: GPTQModel's v2 -> v1 writer, then its loader (v1 -> v2) and TorchLinear
                R.gm_model.convert_gptq_v2_to_v1_format_module(m, types.SimpleNamespace(bits=bits,
                                                                                         pack_dtype=torch.int32))
                t1 = dict(t, qzeros=m.qzeros.clone())
                qc1 = dict(qc, checkpoint_format="gptq")
                ref1, path1 = layer(tmp, t1, qc1, name="v1")
                R.gm_model.convert_gptq_v1_to_v2_format_module(m, bits=bits, pack_dtype=torch.int32)
                m._stream_reset_cache()
                sat = ref1.v1_saturated()
                same(m.dequantize_weight(), ref1.dequantized(),
                     f"{tag} v1 vs GPTQModel v1->v2 + TorchLinear.dequantize_weight", results,
                     f" ({sat} all-ones v1 zero fields)")
                conv = R.gm_dequant.convert_gptq_file(path1, torch.float16, qc1, "cpu")["layer.weight"]
                stored = gptq.fields(t1["qzeros"].numpy(), np.arange(out_f), bits, axis=1)
                per = 32 // bits
                carry = bits != 3 and bool(np.any((stored == (1 << bits) - 1) & (np.arange(out_f) % per != per - 1)))
                # (an all-ones field below a word's top: GPTQModel's two readers disagree there, see gptq.py)
                same(conv.t(), ref1.dequantized(), f"{tag} v1 vs GPTQModel convert_gptq_file", results,
                     f" ({sat} all-ones v1 zero fields" + ("; convert_gptq_file adds 1 per field without the carry "
                                                          "its TorchLinear loader has)" if carry else ")"),
                     differs=carry)


def autogptq_cases(R, tmp: Path, results: list) -> None:
    """AutoGPTQ 0.7.1 writes v1 (its pack) and reads it (the torch path of its forward)."""
    import torch

    in_f, out_f = 256, 64
    for mod, label in ((R.ag_cuda_old, "qlinear_cuda_old"), (R.ag_cuda, "qlinear_cuda")):
        for bits in (2, 3, 4, 8):
            for group, desc_act, sym in ((32, False, True), (64, False, False), (64, True, False)):
                if desc_act and label == "qlinear_cuda_old":
                    continue  # cuda_old ignores g_idx
                q, z, s, g_idx, w = gptq_codes(bits, in_f, out_f, group, desc_act, sym, seed=7 + bits + group)
                lin = torch.nn.Linear(in_f, out_f, bias=False)
                lin.weight.data = w
                m = mod.QuantLinear(bits, group, in_f, out_f, bias=False)
                m.pack(lin, s, z, g_idx)
                m.scales = m.scales.half()  # pack keeps them in the Linear's dtype: a float16 model's
                m.autogptq_cuda_available = False
                qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym}
                t = {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales, "g_idx": m.g_idx}
                ref, _ = layer(tmp, t, qc, name="ag")
                if hasattr(m, "wf"):
                    m.wf = m.wf.to(torch.int32)
                with torch.no_grad():
                    out = m(torch.eye(in_f, dtype=torch.float16))  # the dequantized [in, out] weight, exactly
                same(out, ref.dequantized(), f"gptq bits={bits} group={group} desc_act={desc_act} sym={sym} v1 "
                     f"written by AutoGPTQ pack vs AutoGPTQ {label} torch dequant", results)


def awq_cases(R, tmp: Path, results: list) -> None:
    import numpy as np
    import torch

    from loratool.quant import gptq

    in_f, out_f = 256, 96
    for group in (32, 128):
        g = torch.Generator().manual_seed(group)
        groups = in_f // group
        q = torch.randint(0, 16, (out_f, in_f), generator=g)
        z = torch.randint(0, 16, (groups, out_f), generator=g)
        s = (torch.rand(groups, out_f, generator=g) * 0.02 + 1e-3).half()
        gi = torch.arange(in_f) // group
        w = (q - z.t()[:, gi]).float() * s.float().t()[:, gi]
        lin = torch.nn.Linear(in_f, out_f, bias=True)
        lin.weight.data = w
        m = R.awq_gemm.WQLinear_GEMM.from_linear(lin, 4, group, scales=s, zeros=z)
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
        t = {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales, "bias": m.bias}
        ref, path = layer(tmp, t, qc, name="awq")
        p = ref.arrays()
        slots = np.asarray(gptq.AWQ_SLOT)[np.arange(out_f) % 8]
        codes = gptq.fields(p.qweight, np.arange(out_f), 4, axis=1, slot=slots)
        results.append(f"{'OK  ' if np.array_equal(codes.T, q.numpy()) else 'DIFF'} awq group={group}: codes unpacked "
                       "= codes packed by AutoAWQ WQLinear_GEMM.from_linear")
        same(R.awq_pack.dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, group), ref.dequantized(),
             f"awq group={group} vs AutoAWQ dequantize_gemm", results)
        same(R.gm_awq.dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, group), ref.dequantized(),
             f"awq group={group} vs GPTQModel awq dequantize_gemm", results)
        conv = R.gm_dequant.convert_awq_file(path, torch.float16, "cpu")["layer.weight"]
        same(conv.t(), ref.dequantized(), f"awq group={group} vs GPTQModel convert_awq_file", results,
             " (convert_awq_file unpacks without AWQ's column order)", differs=True)
        same(conv.t(), R.awq_pack.dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, group).t().contiguous().numpy(),
             f"awq group={group}: GPTQModel convert_awq_file vs AutoAWQ dequantize_gemm themselves", results,
             differs=True)
    # GPTQModel's AWQ at other widths: a plain bit stream along the output dimension
    for bits in (2, 3, 8):
        g = torch.Generator().manual_seed(bits)
        group, groups = 64, in_f // 64
        q = torch.randint(0, 1 << bits, (in_f, out_f), generator=g, dtype=torch.int32)
        z = torch.randint(0, 1 << bits, (groups, out_f), generator=g, dtype=torch.int32)
        s = (torch.rand(groups, out_f, generator=g) * 0.02 + 1e-3).half()
        qw, qz = R.gm_awq.pack_awq(q, z, bits)
        qc = {"quant_method": "awq", "bits": bits, "group_size": group, "version": "gemm"}
        ref, _ = layer(tmp, {"qweight": qw, "qzeros": qz, "scales": s}, qc, name="awqb")
        same(R.gm_awq.dequantize_gemm(qw, qz, s, bits, group), ref.dequantized(),
             f"awq bits={bits} (GPTQModel pack_awq) vs GPTQModel awq dequantize_gemm", results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refs", default="/tmp/loratool-gptq-refs")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gptq_reference.txt"))
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    R = load(fetch(Path(args.refs)))
    results: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        for fn in (gptqmodel_cases, autogptq_cases, awq_cases):
            fn(R, Path(d), results)
    import numpy

    head = [f"loratool.quant.gptq vs references (torch {torch.__version__}, numpy {numpy.__version__}; "
            f"{', '.join(PINS)}; pure-torch modules loaded from the pip-downloaded files)"]
    bad = [r for r in results if r.startswith("DIFF")]
    known = [r for r in results if r.startswith("EXPECTED")]
    text = "\n".join(head + results + [f"{len(results) - len(bad) - len(known)} OK, {len(known)} EXPECTED "
                                       f"(references disagreeing with each other), {len(bad)} DIFF"]) + "\n"
    Path(args.out).write_text(text)
    print(text)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
