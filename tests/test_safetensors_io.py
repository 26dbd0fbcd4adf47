import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.errors import FormatError, InputError, OutputError, UnsafeFormatError
from loratool.safetensors_io import SafetensorsFile, atomic_dir, atomic_path, write_safetensors

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _tensor(dtype, shape=(3, 5)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    return (x > 0) if dtype is torch.bool else x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reader_matches_safetensors_bit_for_bit(tmp_path, dtype):
    p = tmp_path / "t.safetensors"
    t = {"a": _tensor(dtype), "empty": torch.zeros((0, 4), dtype=dtype), "scalar": _tensor(dtype, ())}
    save_file(t, str(p), metadata={"k": "v"})
    st = SafetensorsFile(p)
    assert st.metadata == {"k": "v"}
    for name, ref in t.items():
        got = st.read(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert got.reshape(-1).view(torch.uint8).tolist() == ref.reshape(-1).view(torch.uint8).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_writer_output_loads_in_safetensors(tmp_path, dtype):
    src = tmp_path / "src.safetensors"
    save_file({"x": _tensor(dtype, (7, 3))}, str(src))
    out = tmp_path / "out.safetensors"
    ref = SafetensorsFile(src).ref("x")
    write_safetensors(out, [("raw", ref), ("tensor", _tensor(dtype, (2, 2)))], {"format": "pt"})
    loaded = load_file(str(out))
    assert loaded["raw"].view(torch.uint8).tolist() == _tensor(dtype, (7, 3)).view(torch.uint8).tolist()
    assert torch.equal(loaded["tensor"], _tensor(dtype, (2, 2)))
    assert SafetensorsFile(out).metadata == {"format": "pt"}
    # raw copies are byte-exact: the data section equals the source's
    assert SafetensorsFile(out).read_bytes("raw") == SafetensorsFile(src).read_bytes("x")


def _good(tmp_path):
    p = tmp_path / "g.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(p))
    return p


def test_truncated_and_lying_headers(tmp_path):
    p = _good(tmp_path)
    data = p.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:-10])
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(bad)
    bad.write_bytes(data[:5])
    with pytest.raises(FormatError, match="8-byte"):
        SafetensorsFile(bad)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["w"]["shape"] = [4, 5]
    raw = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(FormatError, match="header lies"):
        SafetensorsFile(bad)
    bad.write_bytes(struct.pack("<Q", 4) + b"[1,2" + data[8 + n:])
    with pytest.raises(FormatError, match="not valid JSON"):
        SafetensorsFile(bad)


def test_pickle_refused_without_loading(tmp_path):
    p = tmp_path / "model.safetensors"  # the suffix lies; the magic bytes tell
    torch.save({"x": torch.zeros(1)}, str(p))
    with pytest.raises(UnsafeFormatError, match="never unpickles"):
        SafetensorsFile(p)
    with pytest.raises(InputError, match="no such file"):
        SafetensorsFile(tmp_path / "missing.safetensors")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"done")
    assert dest.read_bytes() == b"done"
    with pytest.raises(OutputError, match="already exists"):
        with atomic_path(dest):
            pass
    assert dest.read_bytes() == b"done"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "outdir"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as tmp:
            (tmp / "a").write_text("x")
            raise KeyboardInterrupt
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("x")
    assert (dest / "a").read_text() == "x"
    # --overwrite replaces only what would be written: a file the new output lacks is kept (refused)
    with pytest.raises(OutputError, match="holds a, which this output does not write"):
        with atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "b").write_text("y")
    assert sorted(p.name for p in dest.iterdir()) == ["a"] and (dest / "a").read_text() == "x"
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "a").write_text("z")
        (tmp / "b").write_text("y")
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b"] and (dest / "a").read_text() == "z"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir"]


def test_unreadable_safetensors_output_is_never_published(tmp_path):
    dest = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="read-back check"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
    assert list(tmp_path.iterdir()) == []
    d = tmp_path / "outdir"
    with pytest.raises(OutputError, match="read-back check"):
        with atomic_dir(d) as tmp:
            (tmp / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16"])
def test_has_nonfinite_finds_every_nan_and_inf(dtype):
    """The check that resize, compose and merge run on every factor before any arithmetic."""
    import numpy as np

    from loratool.adapter import has_nonfinite
    from loratool.safetensors_io import host_tensor

    x = np.linspace(-3e4, 3e4, 101)  # large but finite in every dtype (float16 tops at 65504)
    assert not has_nonfinite(host_tensor(x, dtype))
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 57, 100):
            y = x.copy()
            y[where] = bad
            assert has_nonfinite(host_tensor(y, dtype)), (dtype, bad, where)
