"""loratool.quant.bnb against bitsandbytes itself: dequant(quant(W)) bit for bit (issue 16)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from loratool.quant import bnb as Q

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")
from tests.bnbref import canonical, dequantize_4bit  # noqa: E402  (after the skip)

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}


def _bits(t) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 96), (37, 51), (33,), (300, 200)])
def test_roundtrip_is_bitsandbytes(dtype, quant_type, blocksize, double_quant, shape):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, quant_type, blocksize, double_quant, shape)).encode()))
    w = (torch.randn(shape, generator=g) * 0.05).to(DTYPES[dtype])
    w.view(-1)[:3] = 0  # zeros: FP4's signed zero codes
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    want = canonical(_bits(dequantize_4bit(packed, state)), quant_type)
    got = Q.roundtrip(_bits(w), dtype, Q.QuantSpec(quant_type, blocksize, double_quant))
    assert got.shape == want.shape
    got = canonical(got.view(np.uint16), quant_type)
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} elements differ"
    # and the intermediate state itself
    x = Q.from_dtype_bits(_bits(w).reshape(-1), dtype)
    mine_packed, absmax = Q.quantize_4bit(x, blocksize, quant_type)
    assert np.array_equal(mine_packed, packed.numpy().reshape(-1))
    if double_quant:
        nest = Q.quantize_absmax(absmax)
        assert nest.offset == np.float32(state.offset.item())
        assert np.array_equal(nest.qabsmax, state.absmax.numpy())
        assert np.array_equal(nest.nested_absmax, state.state2.absmax.numpy())
        assert np.array_equal(nest.nested_code, state.state2.code.numpy())
    else:
        assert np.array_equal(absmax, state.absmax.numpy())


def test_dynamic_map_is_bitsandbytes():
    assert np.array_equal(Q.dynamic_map(), F.create_dynamic_map().numpy())


@pytest.mark.parametrize("n", [7, 100, 1000, 40000, 70001])
def test_offset_sum_is_torchs_single_threaded_sum(n):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = torch.mean(x).item()
    finally:
        torch.set_num_threads(threads)
    assert np.float32(want) == Q.torch_sum_f32(x.numpy()) / np.float32(n)


def test_row_blocks_equal_the_whole_tensor():
    """A row block quantized with the whole tensor's scales gives the whole tensor's bits."""
    w = (torch.randn(96, 64, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    spec = Q.QuantSpec("nf4", 64, True)
    raw = _bits(w)
    whole = Q.roundtrip(raw, "BF16", spec)
    x = Q.from_dtype_bits(raw.reshape(-1), "BF16")
    scale, absmax = Q.scales(x, spec), Q.absmax_4bit(x, 64)
    for i, j in [(0, 32), (32, 33), (33, 96)]:
        b0, b1 = i * 64 // 64, j * 64 // 64
        part = Q.roundtrip(raw[i:j], "BF16", spec, scale=scale[b0:b1], absmax=absmax[b0:b1], shape=(96, 64))
        assert np.array_equal(part, whole[i:j])


@pytest.mark.parametrize("text,want", [
    ("keep", None), ("nf4", Q.QuantSpec("nf4", 64, False)), ("fp4,blocksize=128", Q.QuantSpec("fp4", 128, False)),
    ("nf4,blocksize=64,double-quant", Q.QuantSpec("nf4", 64, True)),
])
def test_parse_precision(text, want):
    assert Q.parse_precision(text) == want


@pytest.mark.parametrize("text", ["int4", "nf4,blocksize=100", "nf4,foo", "keep,double-quant", ""])
def test_parse_precision_refuses(text):
    with pytest.raises(ValueError):
        Q.parse_precision(text)


# -- the fused round trip (the table of top KEY_BITS bits) against the step-by-step reference -----------

def _every_finite(dtype: str, rng) -> np.ndarray:
    """Every finite value of a 16-bit ``dtype`` (shuffled, as raw bits), in blocks of 64 whose
    largest magnitude varies, so that the scaled values land on and around every midpoint; for
    F32, the midpoints themselves, their neighbours and random values, scaled by 1."""
    if dtype == "F32":
        mids = np.concatenate([Q.bounds("nf4"), Q.bounds("fp4")])
        near = [mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
                np.array([0, -0.0, 1, -1, 1e-45, -1e-45], np.float32),
                rng.uniform(-1, 1, 4000).astype(np.float32)]
        x = np.concatenate(near).astype(np.float32)
        x = np.concatenate([x, np.zeros(-x.size % 63, np.float32)]).reshape(-1, 63)
        return np.concatenate([np.ones((x.shape[0], 1), np.float32), x], axis=1).reshape(-1)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exp = (bits >> (7 if dtype == "BF16" else 10)) & (0xFF if dtype == "BF16" else 0x1F)
    bits = rng.permutation(bits[exp != (0xFF if dtype == "BF16" else 0x1F)])
    return bits[: bits.size // 64 * 64]


@pytest.fixture(params=["C", "numpy"])
def fused(request, monkeypatch):
    """The fused round trip's two paths: the C loop (kernels/cpu.c, where it is built) and numpy's."""
    if request.param == "numpy":
        monkeypatch.setenv("LORATOOL_NATIVE", "0")
    return request.param


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fused_roundtrip_is_the_reference_on_every_midpoint(fused, dtype, quant_type):
    raw = _every_finite(dtype, np.random.default_rng(7))
    spec = Q.QuantSpec(quant_type, 64, False)
    want = Q.roundtrip_reference(raw, dtype, spec)
    got = Q.roundtrip(raw, dtype, spec)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), f"{np.count_nonzero(got != want)} differ"
    # the midpoints are hit: some values take the slow, exact path
    s = Q.from_dtype_bits(raw, dtype).reshape(-1, 64) / Q.absmax_4bit(Q.from_dtype_bits(raw, dtype), 64)[:, None]
    assert np.isnan(Q.key_table(quant_type)[s.astype(np.float32).view(np.uint32) >> Q.KEY_SHIFT]).any()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_on_the_midpoints_quantize_as_bitsandbytes(quant_type):
    """float32 values exactly on each midpoint (and one ulp either side) take bitsandbytes' code."""
    x = _every_finite("F32", np.random.default_rng(11))
    w = torch.from_numpy(x.copy())
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    want = dequantize_4bit(packed, state).numpy().reshape(-1)
    got = Q.roundtrip(x, "F32", Q.QuantSpec(quant_type, 64, False))
    assert np.array_equal(canonical(got.view(np.uint32), quant_type), canonical(want.view(np.uint32), quant_type))


def test_key_table_is_exact_where_it_answers():
    """Every run of 2**KEY_SHIFT floats the table answers for has that one nearest code (both ends)."""
    for qt in ("nf4", "fp4"):
        table = Q.key_table(qt)
        assert table.size == 1 << Q.KEY_BITS
        first = np.arange(1 << Q.KEY_BITS, dtype=np.uint32) << np.uint32(Q.KEY_SHIFT)
        for ends in (first, first | np.uint32((1 << Q.KEY_SHIFT) - 1)):
            q = np.searchsorted(Q.bounds(qt), ends.view(np.float32), side="left")
            code = Q.CODES[qt][Q.ORDER[qt][q]]
            ok = ~np.isnan(table)
            assert np.array_equal(table[ok].view(np.uint32), code[ok].view(np.uint32))
        assert 0 < np.isnan(table).sum() <= 4 * 15  # a few runs straddle a midpoint


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_roundtrip_norms(fused, dtype):
    w = (torch.randn(96, 80, generator=torch.Generator().manual_seed(5)) * 0.03).to(DTYPES[dtype])
    raw = _bits(w)
    spec = Q.QuantSpec("nf4", 64, True)
    out, w_sq, q_sq = Q.roundtrip_norms(raw, dtype, spec)
    assert np.array_equal(out, Q.roundtrip_reference(raw, dtype, spec))
    x = Q.from_dtype_bits(raw.reshape(-1), dtype).astype(np.float64)
    q = x - Q.from_dtype_bits(out.reshape(-1), dtype)
    assert w_sq == pytest.approx(float(x @ x), rel=1e-5) and q_sq == pytest.approx(float(q @ q), rel=1e-5)
    assert q_sq > 0


@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", False, 64), ("nf4", True, 64),
                                                               ("fp4", True, 128)])
def test_roundtrip_in_chunks_is_the_roundtrip_at_once(fused, monkeypatch, quant_type, double_quant, blocksize):
    """A tensor larger than CHUNK goes through in chunks of whole blocks (the last one partial): the
    same bits as the whole tensor at once and as the step-by-step reference, and the same norms."""
    raw = _bits((torch.randn(3 * 5000 + 17, generator=torch.Generator().manual_seed(3)) * 0.03).to(torch.bfloat16))
    spec = Q.QuantSpec(quant_type, blocksize, double_quant)
    monkeypatch.setattr(Q, "CHUNK", 1 << 30)
    monkeypatch.setattr(Q, "NATIVE_CHUNK", 1 << 30)
    whole, w_whole, q_whole = Q.roundtrip_norms(raw, "BF16", spec)
    monkeypatch.setattr(Q, "CHUNK", 5000)  # chunks of 4992 or 4864 elements, then the rest
    monkeypatch.setattr(Q, "NATIVE_CHUNK", 5000)
    chunks, w_sq, q_sq = Q.roundtrip_norms(raw, "BF16", spec)
    assert np.array_equal(chunks, whole) and np.array_equal(chunks, Q.roundtrip_reference(raw, "BF16", spec))
    # the sums: float32 dot products of each chunk's pieces (64K elements at most), added in float64
    assert w_sq == pytest.approx(w_whole, rel=1e-6) and q_sq == pytest.approx(q_whole, rel=1e-6) and q_sq > 0
    out = np.zeros_like(raw)  # into the caller's buffer, as the merge's transform asks
    Q.roundtrip_norms(raw, "BF16", spec, out=out)
    assert np.array_equal(out, whole)


# -- the merge's transform: row blocks computed ahead of the engine (merge/basequant.py) ------------

@pytest.mark.parametrize("double_quant", [False, True])
def test_blocks_computed_ahead_are_the_whole_tensors_round_trip(tmp_path, monkeypatch, double_quant):
    """``Requantize`` on the executor's thread computes the next row block from the base file
    while the engine has the current one: blocks asked in order come from there (hits), a block
    asked out of order or for another tensor is computed at once (misses), and every block has the
    whole tensor's bits, as bitsandbytes computes them; the norms add up over the blocks."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from loratool.merge import basequant
    from loratool.safetensors_io import SafetensorsFile

    monkeypatch.setattr(basequant, "_ways", lambda: 2)
    monkeypatch.setattr(basequant, "SPLIT_MIN", 64)
    g = torch.Generator().manual_seed(21)
    tensors = {"a": (torch.randn(40, 96, generator=g) * 0.02).to(torch.bfloat16),
               "b": (torch.randn(24, 64, generator=g) * 0.3).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    st = SafetensorsFile(tmp_path / "w.safetensors")
    spec = Q.QuantSpec("nf4", 64, double_quant)
    rq = basequant.Requantize(spec)
    takes = []
    real_take = basequant._Ahead.take

    def take(self, owner, i, j):
        got = real_take(self, owner, i, j)
        takes.append((i, j, got is not None))
        return got

    monkeypatch.setattr(basequant._Ahead, "take", take)
    spans = {"a": [(0, 8), (8, 16), (16, 24), (32, 40), (24, 32)], "b": [(0, 8), (8, 16), (16, 24)]}
    applies = {}
    for name in ("a", "b"):
        ref = st.ref(name)
        t = SimpleNamespace(name=name, src=ref, shape=tuple(ref.shape), numel=ref.info.numel)
        applies[name] = (t, rq.prepare(t))
    for name in ("a", "b", "a"):  # the second "a": a tensor other than the one computed ahead
        t, apply = applies[name]
        raw = _bits(tensors[name])
        want = _bits(dequantize_4bit(*F.quantize_4bit(tensors[name], blocksize=64, quant_type="nf4",
                                                          compress_statistics=double_quant)))
        assert np.array_equal(Q.roundtrip(raw, "BF16", spec), want)
        cols = raw.shape[1]
        for i, j in spans[name] if name == "b" else spans[name][:3]:
            block = bytearray(raw[i:j].tobytes())
            out, nbytes = apply(block, len(block), i, j)
            assert nbytes == (j - i) * cols * 2
            assert np.array_equal(np.asarray(out).view(np.uint16).reshape(j - i, cols), want[i:j]), (name, i, j)
    t, apply = applies["a"]
    for i, j in spans["a"][3:]:  # out of order: (32, 40) was not the guess after (16, 24), nor is (24, 32)
        raw = _bits(tensors["a"])
        out, _ = apply(bytearray(raw[i:j].tobytes()), (j - i) * raw.shape[1] * 2, i, j)
        want = Q.roundtrip_reference(raw, "BF16", spec)
        assert np.array_equal(np.asarray(out).view(np.uint16).reshape(j - i, -1), want[i:j])
    hits = [h for _, _, h in takes]
    assert hits == [False, True, True, False, True, True, False, True, True, False, False], takes
    # the norms: each block counted once, hit or miss (tensor "a" went through twice over rows 0-24)
    x = Q.from_dtype_bits(_bits(tensors["b"]).reshape(-1), "BF16").astype(np.float64)
    assert rq.terms["b"].w_sq == pytest.approx(float(x @ x), rel=1e-5)


def test_blocks_computed_ahead_read_the_base_from_its_mapped_pages(tmp_path):
    """``_map_elements``: the tensor's raw elements over a mapping of its file (what the blocks
    computed ahead read), equal to its bytes; a file shorter than its header says is refused in
    one line, never mapped past its end."""
    from safetensors.torch import save_file

    from loratool.errors import InputError
    from loratool.merge.basequant import _map_elements
    from loratool.safetensors_io import SafetensorsFile

    x = (torch.randn(3, 1000, generator=torch.Generator().manual_seed(3)) * 0.1).to(torch.bfloat16)
    save_file({"pad": torch.zeros(5), "w": x}, str(tmp_path / "w.safetensors"))
    ref = SafetensorsFile(tmp_path / "w.safetensors").ref("w")
    assert np.array_equal(_map_elements(ref), _bits(x).reshape(-1))
    import dataclasses
    from types import SimpleNamespace

    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])  # cut after its header was read
    cut = dataclasses.replace(ref, file=SimpleNamespace(path=tmp_path / "cut.safetensors"))
    with pytest.raises(InputError, match="truncated"):
        _map_elements(cut)
