"""loratool.npmerge: the torch-free plain merge must give torch's (PEFT's) bits, and say when it
cannot; the merge must pick it, write the same files through O_DIRECT or the page cache, and
never import torch on that path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from loratool import merge as M
from loratool.merge import numpy_engine as npmerge
from loratool.checkpoint import BaseCheckpoint

SHAPES = [(16, 16), (17, 64), (32, 131), (32, 160), (64, 2048), (256, 96), (67, 257)]
RANKS = [1, 3, 16, 17, 64, 128]


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()]).numpy()


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
def test_torch_gemm_is_the_sequential_fma_chain(rows, cols, rank):
    """The assumption behind the numpy path: torch's float32 GEMM (PEFT's B @ A) computes every
    element as the FMA chain in k order, for the shapes the numpy path takes."""
    rng = np.random.default_rng(rows * cols + rank)
    b = rng.uniform(1, 2, (rows, rank)).astype(np.float32)
    a = rng.uniform(1, 2, (rank, cols)).astype(np.float32)
    with torch.inference_mode():
        got = torch.mm(torch.from_numpy(b), torch.from_numpy(a)).numpy()
    assert np.array_equal(got, npmerge._fma_chain(b, a))


def _chain_gemm(b, a, out=None):
    """A GEMM that is the sequential FMA chain by construction (exact for the probe's values)."""
    got = npmerge._fma_chain(b, a)
    return got if out is None else np.copyto(out, got) or out


def _pairwise_gemm(b, a, out=None):
    """Two half-rank products summed: the k order of a blocked or split-k kernel."""
    half = b.shape[1] // 2
    return np.add(np.matmul(b[:, :half], a[:half]), np.matmul(b[:, half:], a[half:]), out=out)


def _reversed_gemm(b, a, out=None):
    """The chain in reverse k order."""
    return _chain_gemm(b[:, ::-1].copy(), a[::-1].copy(), out)


@pytest.mark.parametrize("rows,cols,rank", [(64, 2048, 16), (32, 131, 32), (17, 64, 3)])
def test_probe_accepts_the_chain_and_detects_a_gemm_that_sums_differently(rows, cols, rank):
    """The probe is not a formality: it vouches for a GEMM that is the chain and refuses ones that
    sum in another order (as numpy's own OpenBLAS does for some shapes, on some CPUs). The GEMMs
    are passed in, so this holds on any machine."""
    assert npmerge.gemm_is_sequential(rows, cols, rank, gemm=_chain_gemm)
    assert not npmerge.gemm_is_sequential(rows, cols, rank, gemm=_pairwise_gemm)
    assert not npmerge.gemm_is_sequential(rows, cols, rank, gemm=_reversed_gemm)


def test_probe_of_the_host_blas_is_what_the_merge_follows(tmp_path):
    """Whatever numpy's BLAS does here, the merge takes numpy exactly where the probe vouches for
    every block's shape, and torch elsewhere (``_numpy_plan``)."""
    from tests.tinybase import base_tensors, save_adapter, save_base

    base = BaseCheckpoint(save_base(tmp_path / "base", base_tensors()))
    for r in (1, 4, 8, 16):
        adapter = save_adapter(tmp_path / f"r{r}", r=r, alpha=2 * r)
        plan = M.plan_merge(base, M.load_adapters(M._specs(str(adapter))))
        assert M._numpy_plan(plan, "cpu") == _vouched(plan), r


def _vouched(plan) -> bool:
    """Whether the probe vouches for numpy's GEMM on this machine in every block of every merged
    tensor of ``plan`` (the numpy path then writes torch's bits; else the merge uses torch)."""
    return all(npmerge.gemm_is_sequential(j - i, t.shape[1], t.terms[0].module.rank)
               for t in plan.tensors() if t.action is M.Action.MERGE
               for i, j in set(M.tensor_spans(t, "cpu")))


def _torch_gemm(b, a, out=None):
    """torch's mm: the sequential chain (test_torch_gemm_is_the_sequential_fma_chain)."""
    got = torch.mm(torch.from_numpy(b), torch.from_numpy(a)).numpy()
    return got if out is None else np.copyto(out, got) or out


@pytest.mark.parametrize("gemm", ["numpy", "chain"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("coef", [2.0, 1.0, -2.0, 32 / 12, -(32 / 12), 0.125])
def test_plain_math_equals_torch_bits(dtype, coef, gemm, tmp_path):
    """PlainMath = TensorMath's float32 path (W + coef·B@A rounded once), bit for bit, for every
    dtype and for scales that are and are not powers of two (fused addmm vs. mm, mul, add).

    ``chain``: with a GEMM that is the sequential chain (torch's), the rest of the arithmetic
    (scale, add, rounding, NaNs, overflow) on any CPU. ``numpy``: with numpy's own GEMM, the
    merge's, where the probe vouches for it on this machine; where it does not, the merge never
    runs it (``eligible`` refuses the shape) and PlainMath's bits need not be torch's."""
    rng = np.random.default_rng(7)
    rows, cols, rank = 96, 160, 16
    w32 = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w32[0, :8] = [0.0, -0.0, 1e-40, -1e-40, 3.3e38, -3.3e38, 1.0, 2.0 ** -126]  # subnormals, near overflow
    b = (rng.standard_normal((rows, rank)) * 0.05).astype(np.float32)
    a = (rng.standard_normal((rank, cols)) * 0.05).astype(np.float32)
    b[0, :] = 1e30  # row 0: huge deltas, to push some sums past bf16's largest value
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    w = torch.from_numpy(w32).to(tdt)
    with torch.inference_mode():
        bt, at = torch.from_numpy(b), torch.from_numpy(a)
        acc = w.to(torch.float32, copy=True)
        if coef != 0 and abs(np.frexp(coef)[0]) == 0.5:
            acc.addmm_(bt, at, alpha=coef)  # TensorMath._fused: what PEFT's bits need for 2^k
        else:
            acc.add_(torch.mm(bt, at).mul_(coef))
        want = acc.to(tdt)
    engine = npmerge.PlainMath.__new__(npmerge.PlainMath)
    engine.src_dtype = engine.dtype = dtype
    engine.b, engine.a, engine.cols = b, a, cols
    engine.coef = None if coef == 1 else np.float32(coef)
    engine.guard = False  # row 0 overflows on purpose: the rounding of inf is compared here
    raw = _bits(w).view(np.uint16) if dtype == "BF16" else w.numpy()
    if gemm == "chain":
        engine.gemm = _torch_gemm
    else:
        assert engine.gemm is np.matmul  # the merge's GEMM
        vouched = npmerge.gemm_is_sequential(32, cols, rank)
        if not vouched:  # the merge falls back to torch for this shape here: that is the promise
            plan = _plan_of_shape(tmp_path, rows, cols, rank, dtype)
            assert npmerge.eligible(plan, [(0, rows)]) == npmerge.gemm_is_sequential(rows, cols, rank)
            assert not npmerge.eligible(plan, [(i, i + 32) for i in range(0, rows, 32)])
            return
    got = np.concatenate([engine.rows(raw[i:i + 32], i, i + 32) for i in range(0, rows, 32)])
    assert np.array_equal(got.view(np.uint8), _bits(want).view(np.uint8))


def _plan_of_shape(d, rows, cols, rank, dtype):
    """The TensorPlan of one rank-``rank`` Linear module merged at weight 1 into a (rows, cols)
    ``dtype`` base tensor, factors and base in a file in ``d``."""
    from safetensors.torch import save_file

    from loratool.adapter import LayerKind, LoraModule
    from loratool.safetensors_io import SafetensorsFile

    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    save_file({"w": torch.zeros(rows, cols, dtype=tdt), "A": torch.zeros(rank, cols), "B": torch.zeros(rows, rank)},
              str(d / "t.safetensors"))
    f = SafetensorsFile(d / "t.safetensors")
    m = LoraModule("m", LayerKind.LINEAR, f.ref("A"), f.ref("B"), alpha=float(rank))
    return M.TensorPlan("w", f.ref("w"), dtype, M.Action.MERGE, terms=[M.Term(m, m.scale, 1.0, "adapter")])


def test_bf16_rounding_ties_and_overflow():
    """Round to nearest even at exact ties, carries into the exponent, and overflow to inf, as
    torch's float32 → bfloat16 conversion does."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x3FFF8000, 0x7F7FFFFF, 0x7F7F8000,
                     0xBF808000, 0x00008000, 0x00018000, 0x7F800000, 0xFF800000], dtype=np.uint32)
    v = bits.view(np.float32).copy()
    got = npmerge.round_from_float32(v.copy(), "BF16", np.empty(len(v), np.uint16), np.empty(len(v), np.uint32))
    want = torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_nans_are_written_as_torch_writes_them(dtype):
    """The integer rounding alone would turn some NaNs into ±0 or inf (0x7FFFFFFF, 0x7F800001);
    NaNs come out as torch's conversion writes them, next to ordinary values."""
    bits = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0xFFC00001, 0x3F808000, 0xFF800000,
                     0x7F7FFFFF], dtype=np.uint32)
    v = np.tile(bits, 5).view(np.float32).reshape(5, -1)
    want = torch.from_numpy(v.copy()).to({"BF16": torch.bfloat16, "F16": torch.float16}[dtype])
    got = npmerge.round_from_float32(v.copy(), dtype, np.empty(v.shape, npmerge.RAW[dtype]),
                                     np.empty(v.shape, np.uint32), np.empty(v.shape, bool))
    assert np.array_equal(got.view(np.uint16), _bits(want).view(np.uint16))


def test_unmerge_bits_do_not_depend_on_the_engine(tmp_path):
    """A:-1 (and unmerge) with a scale that is not a power of two: numpy and torch both give
    PEFT's W - (B@A)·s, one rounding of each step, bit for bit."""
    from tests.tinybase import base_tensors, save_adapter, save_base

    base = save_base(tmp_path / "base", base_tensors())  # float32: the bits show every rounding
    adapter = save_adapter(tmp_path / "adapter", r=4, alpha=6)  # scale 1.5
    outs = []
    for name, env in {"np": {}, "torch": {"LORATOOL_MERGE_ENGINE": "torch"}}.items():
        p = _merge(["--base", base, "--adapters", f"{adapter}:-1", "-o", tmp_path / name, "--allow-base-mismatch"],
                   env)
        assert p.returncode == 0, p.stderr
        outs.append(tmp_path / name)
    _same_files(*outs)
    ckpt = BaseCheckpoint(base)
    w = ckpt.ref("model.layers.0.self_attn.q_proj.weight").load().float()
    from safetensors.torch import load_file

    ad = load_file(str(adapter / "adapter_model.safetensors"))
    k = "base_model.model.model.layers.0.self_attn.q_proj"
    want = w - (ad[k + ".lora_B.weight"] @ ad[k + ".lora_A.weight"]) * 1.5
    got = BaseCheckpoint(outs[0]).ref("model.layers.0.self_attn.q_proj.weight").load()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def _merge(cli_args, env=None):
    return subprocess.run([sys.executable, "-m", "loratool", "merge", *map(str, cli_args), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def _same_files(a, b):
    ca, cb = BaseCheckpoint(a), BaseCheckpoint(b)
    assert sorted(ca.names()) == sorted(cb.names())
    for name in ca.names():
        assert ca.ref(name).raw() == cb.ref(name).raw(), name
    for f in sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _bf16_pair(d):
    """A bf16 base and a bf16 adapter (tinybase shapes) whose rank the probe vouches for on this
    machine if any rank from 1 to 16 does, so that the numpy path runs here where it can."""
    from tests.tinybase import base_tensors, save_adapter, save_base

    tensors = {k: v.to(torch.bfloat16) for k, v in base_tensors().items()}
    base = save_base(d / "base", tensors)
    ckpt = BaseCheckpoint(base)
    for r in (4, 8, 16, 2, 1):
        adapter = save_adapter(d / f"adapter_r{r}", r=r, alpha=2 * r)
        plan = M.plan_merge(ckpt, M.load_adapters(M._specs(str(adapter))))
        if _vouched(plan):
            break
    return base, adapter


@pytest.mark.parametrize("source", ["peft_fixture", "vouched_rank"])
def test_numpy_direct_buffered_and_torch_paths_write_the_same_bytes(fixtures_dir, tmp_path, source):
    """The numpy path (O_DIRECT and through the page cache) writes torch's bytes where the probe
    vouches for numpy's GEMM here; elsewhere the merge takes torch, and the files are the same."""
    if source == "peft_fixture":
        base, adapter = fixtures_dir / "base_llama", fixtures_dir / "llama_r8_bf16"
    else:
        base, adapter = _bf16_pair(tmp_path)
    plan = M.plan_merge(BaseCheckpoint(base), M.load_adapters(M._specs(str(adapter))))
    assert M._numpy_plan(plan, "cpu") == _vouched(plan)
    assert M._direct_supported(tmp_path)
    runs = {"direct": {}, "buffered": {"LORATOOL_DIRECT_IO": "0"}, "torch": {"LORATOOL_MERGE_ENGINE": "torch"}}
    for name, env in runs.items():
        p = _merge(["--base", base, "--adapters", adapter, "-o", tmp_path / name, "--allow-base-mismatch"], env)
        assert p.returncode == 0, p.stderr
    _same_files(tmp_path / "direct", tmp_path / "torch")
    _same_files(tmp_path / "buffered", tmp_path / "torch")
    a, b = ({f.name: json.loads(f.read_text()) for f in (tmp_path / n).glob("*.index.json")}
            for n in ("direct", "torch"))
    assert a == b and (source == "vouched_rank" or a)  # the fixture base is sharded


def test_engine_and_direct_io_are_parameters(tmp_path):
    """From Python the engine and the O_DIRECT output are ``merge``'s parameters (the CLI reads
    LORATOOL_MERGE_ENGINE and LORATOOL_DIRECT_IO and passes them): every choice writes the same
    bytes, and a choice that cannot be honoured is refused before anything is written."""
    from loratool.errors import UsageError

    base, adapter = _bf16_pair(tmp_path / "in")
    runs = {"auto": {}, "direct": {"direct_io": True}, "buffered": {"direct_io": False},
            "torch": {"engine": "torch"}}
    plan = M.plan_merge(BaseCheckpoint(base), M.load_adapters(M._specs(str(adapter))))
    if _vouched(plan):
        runs["numpy"] = {"engine": "numpy"}
    for name, params in runs.items():
        M.merge(base, str(adapter), tmp_path / name, device="cpu", **params)
    for name in runs:
        _same_files(tmp_path / name, tmp_path / "torch")
    for spec, engine, message in [(f"{adapter}:0.5", "numpy", "engine 'numpy' cannot"),
                                  (str(adapter), "jax", "unknown merge engine")]:
        with pytest.raises(UsageError, match=message):
            M.merge(base, spec, tmp_path / "refused", device="cpu", engine=engine)
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("source", ["peft_fixture", "vouched_rank"])
def test_plain_cpu_merge_never_imports_torch(fixtures_dir, tmp_path, source):
    """A plain merge that the probe vouches for never imports torch; one it does not vouch for
    (numpy's BLAS sums that shape in another order on this CPU) falls back to torch."""
    if source == "peft_fixture":
        base, adapter = fixtures_dir / "base_llama", fixtures_dir / "llama_r8"
    else:
        base, adapter = _bf16_pair(tmp_path)
    plan = M.plan_merge(BaseCheckpoint(base), M.load_adapters(M._specs(str(adapter))))
    code = ("import sys\nfrom loratool.merge import merge\n"
            f"merge({str(base)!r}, {str(adapter)!r}, {str(tmp_path / 'out')!r}, device='cpu')\n"
            "print('torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(not _vouched(plan))


def test_ineligible_merges_take_torch(fixtures_dir):
    """DoRA, weighted merges, embeddings and small shapes are left to torch."""
    base = BaseCheckpoint(fixtures_dir / "base_llama")
    for spec in [str(fixtures_dir / "llama_dora"), f"{fixtures_dir / 'llama_r8'}:0.5",
                 str(fixtures_dir / "llama_embed_mts")]:
        plan = M.plan_merge(base, M.load_adapters(M._specs(spec)))
        assert not M._numpy_plan(plan, "cpu"), spec
    plan = M.plan_merge(base, M.load_adapters(M._specs(str(fixtures_dir / "llama_r8"))))
    # eligible: numpy where the probe vouches for numpy's GEMM on this CPU, torch elsewhere
    assert M._numpy_plan(plan, "cpu") == _vouched(plan) and not M._numpy_plan(plan, "cuda")


@pytest.mark.parametrize("shards", [1, 3])
def test_single_file_and_sharded_float32_bases(tmp_path, shards):
    """A base given as one .safetensors file gives one output file; float32 bases; both equal
    the torch path byte for byte (and differ from the base where the adapter applies)."""
    from tests.tinybase import base_tensors, save_adapter, save_base

    d = save_base(tmp_path / "base", base_tensors(), shards=shards)
    base = d / "model.safetensors" if shards == 1 else d
    adapter = save_adapter(tmp_path / "adapter", r=4, alpha=8)
    plan = M.plan_merge(BaseCheckpoint(base), M.load_adapters(M._specs(str(adapter))))
    assert M._numpy_plan(plan, "cpu") == _vouched(plan) and plan.single_file == (shards == 1)
    outs = {}
    for name, env in {"direct": {}, "torch": {"LORATOOL_MERGE_ENGINE": "torch"}}.items():
        out = tmp_path / (name + (".safetensors" if shards == 1 else ""))
        p = _merge(["--base", base, "--adapters", adapter, "-o", out, "--allow-base-mismatch"], env)
        assert p.returncode == 0, p.stderr
        outs[name] = out
    if shards == 1:
        assert outs["direct"].read_bytes() == outs["torch"].read_bytes()
        assert outs["direct"].read_bytes() != base.read_bytes()
    else:
        _same_files(outs["direct"], outs["torch"])


def test_mixed_dtypes_and_odd_widths_reuse_output_buffers(tmp_path):
    """Output arrays are reused from tensor to tensor: a bf16 tensor with an odd number of
    elements per block followed by float32 tensors must not trip over the previous one's size."""
    import json as _json

    from safetensors.torch import save_file

    from loratool.safetensors_io import write_safetensors

    g = torch.Generator().manual_seed(0)
    shapes = {"a": ((129, 16385), torch.bfloat16), "b": ((64, 64), torch.float32), "c": ((48, 80), torch.float16)}
    base = tmp_path / "base"
    base.mkdir()
    tensors = {f"model.{n}.weight": torch.randn(*s, generator=g).to(dt) for n, (s, dt) in shapes.items()}
    tensors["model.ab.weight"] = torch.randn(8, 8, generator=g)  # copied raw, between a and b: a drain
    write_safetensors(base / "model.safetensors", sorted(tensors.items()))  # in this order in the file
    (base / "config.json").write_text("{}")
    ad = tmp_path / "ad"
    ad.mkdir()
    factors = {}
    for n, ((rows, cols), _) in shapes.items():
        factors[f"base_model.model.model.{n}.lora_A.weight"] = torch.randn(4, cols, generator=g) * 0.1
        factors[f"base_model.model.model.{n}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.1
    save_file(factors, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["a", "b", "c"]}))
    plan = M.plan_merge(BaseCheckpoint(base), M.load_adapters(M._specs(str(ad))))
    assert M._numpy_plan(plan, "cpu") == _vouched(plan)
    for name, env in {"np": {}, "torch": {"LORATOOL_MERGE_ENGINE": "torch"}}.items():
        p = _merge(["--base", base, "--adapters", ad, "-o", tmp_path / name], env)
        assert p.returncode == 0, p.stderr
    _same_files(tmp_path / "np", tmp_path / "torch")


def test_direct_output_never_writes_past_its_size(tmp_path):
    """Under a file-size limit just above the output's size (below its size rounded up to a
    page), the O_DIRECT path must succeed: its last partial page goes through the page cache."""
    import resource

    from tests.tinybase import base_tensors, save_adapter, save_base

    base = save_base(tmp_path / "base", base_tensors()) / "model.safetensors"
    adapter = save_adapter(tmp_path / "adapter", r=4, alpha=8)
    size = base.stat().st_size  # the merged file has the same header and dtypes
    assert size % 4096, "the test needs an output that does not end on a page boundary"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1, size + 1))

    out = tmp_path / "out.safetensors"
    p = subprocess.run([sys.executable, "-m", "loratool", "merge", "--base", str(base), "--adapters", str(adapter),
                        "-o", str(out), "--allow-base-mismatch", "--quiet"], capture_output=True, text=True,
                       preexec_fn=limit)
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size == size


def test_scale_is_folded_into_a_only_when_it_commutes():
    rng = np.random.default_rng(5)
    b = (rng.standard_normal((64, 16)) * 0.02).astype(np.float32)
    a = (rng.standard_normal((16, 96)) * 0.02).astype(np.float32)
    for coef in (2.0, -2.0, 0.25, 4.0):
        assert npmerge._scale_commutes(b, a, coef)
        assert np.array_equal(b @ (a * np.float32(coef)), (b @ a) * np.float32(coef))
    assert not npmerge._scale_commutes(b, a, 1.5)  # not a power of two
    tiny = b * np.float32(2.0 ** -60)  # products near the subnormal range: scaling need not commute
    assert not npmerge._scale_commutes(tiny, a, 0.5)
    # why it is checked: products in the subnormal range round differently once scaled
    b2 = (rng.uniform(1, 2, (64, 16)) * 2.0 ** -70).astype(np.float32)
    a2 = (rng.uniform(-2, 2, (16, 64)) * 2.0 ** -70).astype(np.float32)
    assert not np.array_equal(b2 @ (a2 * np.float32(0.5)), (b2 @ a2) * np.float32(0.5))
    assert not npmerge._scale_commutes(b2, a2, 0.5)


def test_a_worker_that_fails_while_the_caller_waits_raises_its_own_error():
    """A write error in an I/O thread while the caller waits on its full queue (or, the same
    check, for a free O_DIRECT buffer) surfaces as that error: the thread sets it just before it
    ends, so a caller that looked for it first and found the thread dead after its wait must look
    again (this was the occasional "internal error: the writer thread stopped" of the ENOSPC test
    below)."""
    import errno
    import threading

    from loratool.merge.workers import _Worker

    gate = threading.Event()

    class Failing(_Worker):
        def handle(self, item):
            gate.wait()
            raise OSError(errno.ENOSPC, "No space left on device")

    w = Failing("loratool-test", depth=1).start()
    w.put(1)  # taken by the thread, which waits at the gate
    w.put(2)  # fills the queue
    threading.Timer(0.03, gate.set).start()  # the thread fails while the next put waits
    with pytest.raises(OSError, match="No space left"):
        w.put(3)
    assert not w.thread.is_alive()


LEAK_CHECK = """
import errno, gc, os, sys
gc.disable()
from loratool import merge as M
from loratool.merge import writers
real, calls = os.pwrite, [0]
def pwrite(fd, data, off):
    calls[0] += 1
    if calls[0] % 3 == 0:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd, data, off)
os.pwrite = pwrite
writers.DIRECT_CHUNK = 64 << 10
def opened():
    return len(os.listdir("/proc/self/fd")), sum(1 for line in open("/proc/self/maps") if ".safetensors" in line)
before, errors = opened(), []
for k in range(5):
    try:
        M.merge(sys.argv[1], sys.argv[2], os.path.join(sys.argv[3], f"o{k}"), device="cpu", engine=sys.argv[4])
    except Exception as e:
        errors.append(str(e))
print(len(errors), all("No space left" in m for m in errors), before == opened())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("engine", ["auto", "torch"])
def test_a_failed_direct_merge_releases_mappings_and_descriptors(fixtures_dir, tmp_path, engine):
    """A write error in the I/O thread (here ENOSPC) ends the merge with that error, and nothing
    it opened or mapped waits for the garbage collector (a caller that catches the error and
    goes on, with the collector off). ``auto``: numpy's engine and ``SequentialWriter`` (O_DIRECT)
    where the probe vouches for numpy's GEMM on this machine, else as ``torch``: torch's engine and
    ``PrefillWriter``. Both must hold."""
    p = subprocess.run([sys.executable, "-c", LEAK_CHECK, str(fixtures_dir / "base_llama"),
                        str(fixtures_dir / "llama_r8"), str(tmp_path), engine], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["5", "True", "True"]
    assert not list(tmp_path.iterdir())
