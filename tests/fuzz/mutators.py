"""The mutation classes: each turns good fixtures in a case folder into one hostile input.

A mutator has a family (``header``, ``config``, ``base``, ``dest``, ``control``), a name
(``header.shape``), the commands it applies to, and ``build(ws, command, rng)``: copy fixtures
into the workspace, damage them, and return a one-line description of what it did. Every choice
comes from ``rng`` (seeded per case), so a (seed, case index) pair rebuilds the same bytes.

Families:
* header  - the safetensors file of an adapter (PEFT, kohya, diffusers): byte flips, truncation,
            a lying length field, odd dtypes and shapes, overlapping offsets, deep nesting, lone
            surrogates, duplicate keys, zero-size factors, NaN/Inf/1e38 values, odd metadata, ...
* config  - adapter_config.json: wrong types for every field, odd patterns, non-UTF-8 bytes,
            5000-digit integers, depth-10000 nesting, a FIFO or a link to /dev/zero in its place.
* base    - a sharded base: index entries leaving the folder, shards and tokenizer files that are
            links out of it, missing shards, a folder in place of a file, odd config/index JSON.
* dest    - the -o path: an input, its parent, a file inside it, $LORATOOL_HOME, links, a FIFO,
            a device node; each with and without --overwrite.
* path    - the adapter's own name: ':' and ',' (compose's separators), a newline, non-UTF-8 bytes.
* layout  - what sits beside a PEFT adapter: a pickle, a second weights file, links, odd names.
* manifest- loratool.json beside the adapter, damaged after `loratool manifest` wrote it.
* control - no mutation: every command must succeed (or refuse cleanly) on good fixtures.
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import struct
from pathlib import Path
from random import Random
from typing import Any

from tests.fuzz.workspace import (
    ADAPTER_COMMANDS,
    ADAPTERS,
    BASE_COMMANDS,
    LLAMA_ADAPTERS,
    NEEDS_BASE,
    NEEDS_PARTNER,
    OUTPUT_COMMANDS,
    PEFT_ADAPTERS,
    Workspace,
)

# -- JSON with values json.dumps cannot write -----------------------------------------------------


class Raw:
    """A JSON value written verbatim: 5000-digit integers, 1e400, depth-10000 nesting."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) < 40 else f"{self.text[:12]}...({len(self.text)} chars)"


def big_int(digits: int = 5000, negative: bool = False) -> Raw:
    return Raw(("-" if negative else "") + "9" * digits)


def nested(depth: int, kind: str = "list", leaf: str = "1") -> Raw:
    if kind == "list":
        return Raw("[" * depth + leaf + "]" * depth)
    return Raw('{"a":' * depth + leaf + "}" * depth)


def dumps(obj: Any) -> str:
    """json.dumps (NaN/Infinity allowed, lone surrogates escaped as \\udc80) plus Raw values."""
    raws: list[str] = []

    def sub(o):
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(o, dict):
            return {k: sub(v) for k, v in o.items()}
        if isinstance(o, list):
            return [sub(v) for v in o]
        return o

    text = json.dumps(sub(obj), allow_nan=True)
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', r, 1)
    return text


def short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:40] + f"...({len(r)} chars)"


# -- safetensors bytes ----------------------------------------------------------------------------

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def st_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_pack(header: Any, body: bytes, pad: bytes = b" ") -> bytes:
    """A file from a header (dict, or JSON text/bytes as is) and a body; padded to 8 bytes."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode("utf-8", "surrogatepass")
    else:
        raw = dumps(header).encode()
    raw += pad * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def st_tensors(data: bytes) -> tuple[dict | None, dict[str, list]]:
    """(metadata, {name: [dtype, shape, bytes]}) in file order."""
    header, body = st_split(data)
    meta = header.pop("__metadata__", None)
    return meta, {k: [v["dtype"], list(v["shape"]), body[v["data_offsets"][0]:v["data_offsets"][1]]]
                  for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])}


def st_build(meta: dict | None, tensors: dict[str, list]) -> bytes:
    header: dict[str, Any] = {}
    if meta is not None:
        header["__metadata__"] = meta
    body = bytearray()
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    return st_pack(header, bytes(body))


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def pick_tensor(header: dict, rng: Random, lora_first: bool = True) -> str:
    names = tensor_names(header)
    lora = [n for n in names if any(s in n for s in ("lora_A", "lora_B", "lora_down", "lora_up"))]
    return rng.choice(lora if lora_first and lora else names)


def partner_name(name: str) -> str | None:
    for a, b in (("lora_A", "lora_B"), ("lora_B", "lora_A"), ("lora_down", "lora_up"), ("lora_up", "lora_down")):
        if a in name:
            return name.replace(a, b)
    return None


def encode_value(value: float, dtype: str) -> bytes:
    if dtype == "F64":
        return struct.pack("<d", value)
    if dtype == "F16":
        try:
            return struct.pack("<e", value)
        except OverflowError:
            return struct.pack("<e", math.copysign(math.inf, value))
    f32 = struct.pack("<f", value) if abs(value) <= 3.4028234663852886e38 or not math.isfinite(value) \
        else struct.pack("<f", math.copysign(math.inf, value))
    if dtype == "BF16":
        return f32[2:4]
    return f32


# -- the mutator base classes ---------------------------------------------------------------------


class Mutator:
    family = ""
    name = ""
    commands: tuple[str, ...] = ADAPTER_COMMANDS
    sources: tuple[str, ...] = tuple(ADAPTERS)

    def build(self, ws: Workspace, command: str, rng: Random) -> str:
        self.prepare(ws, command, rng)
        detail = self.mutate(ws, command, rng)
        if ws.out is None:
            ws.out = ws.default_out(command)
        return detail

    def prepare(self, ws: Workspace, command: str, rng: Random) -> None:
        ws.use_adapter(rng.choice(self.sources))
        if command in NEEDS_PARTNER:
            ws.use_partner()
        if command in NEEDS_BASE:
            ws.use_base()

    def mutate(self, ws: Workspace, command: str, rng: Random) -> str:
        raise NotImplementedError


class Control(Mutator):
    family, name = "control", "control.clean"

    def mutate(self, ws, command, rng):
        return f"unchanged {ws.adapter_name}"


# -- header ---------------------------------------------------------------------------------------


class HeaderMutator(Mutator):
    """Damages one safetensors file; ``mutate_bytes`` is reused on base shards (base.shard_header)."""

    family = "header"

    def mutate(self, ws, command, rng):
        path = ws.adapter_weights()
        data, detail = self.mutate_bytes(path.read_bytes(), rng)
        path.write_bytes(data)
        return f"{ws.adapter_name}: {detail}"

    def mutate_bytes(self, data: bytes, rng: Random) -> tuple[bytes, str]:
        raise NotImplementedError


class HeaderByteFlip(HeaderMutator):
    name = "header.byte_flip"

    def mutate_bytes(self, data, rng):
        (n,) = struct.unpack("<Q", data[:8])
        out = bytearray(data)
        flips = []
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(8, 8 + n)
            bit = 1 << rng.randrange(8)
            out[pos] ^= bit
            flips.append(f"{pos}^{bit:#x}")
        return bytes(out), f"header bytes flipped at {', '.join(flips)}"


class HeaderTruncate(HeaderMutator):
    name = "header.truncate"

    def mutate_bytes(self, data, rng):
        (n,) = struct.unpack("<Q", data[:8])
        where = rng.choice(["length", "header", "header_end", "body", "last_byte"])
        cut = {"length": rng.randrange(0, 8), "header": rng.randrange(8, 8 + n),
               "header_end": 8 + n, "body": rng.randrange(8 + n, len(data)), "last_byte": len(data) - 1}[where]
        return data[:cut], f"truncated to {cut} of {len(data)} bytes ({where})"


class HeaderLengthLie(HeaderMutator):
    name = "header.length_lie"

    def mutate_bytes(self, data, rng):
        (n,) = struct.unpack("<Q", data[:8])
        value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(data), len(data) * 2, 2**32, 2**63, 2**64 - 1,
                            100 * 1024 * 1024 + 1, len(data) - 8])
        return struct.pack("<Q", value) + data[8:], f"header length field {value} (true {n})"


class HeaderDtype(HeaderMutator):
    name = "header.dtype"
    VALUES = (["F32"], {"F32": 1}, "Q4", "", None, 5, "f32", "F32 ", True, "F32\u0000", "BF16", "F64",
              "I32", "BOOL", "F8_E4M3", "\udc80", "F" * 10000)

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        name = pick_tensor(header, rng)
        value = rng.choice(self.VALUES)
        header[name]["dtype"] = value
        return st_pack(header, body), f"dtype of {name} = {short(value)}"


class HeaderShape(HeaderMutator):
    name = "header.shape"

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        name = pick_tensor(header, rng)
        shape = header[name]["shape"]
        d0, d1 = (shape + [1, 1])[:2]
        numel = math.prod(shape)
        value = rng.choice([
            [True, *shape[1:]], [*shape[:-1], False], [-d0, d1], [-1, -numel], [2**62, 2**62],
            [big_int(), d1], [float(d0), d1], [str(d0), d1], [[d0], d1], [], [numel], [d1, d0],
            [d0, d1, 1, 1], [1] * 64 + [numel], "8x64", None, {"0": d0}, [0, 2**63], [2**32 + d0, d1],
            [d0 * 2**32, d1], [2**64, 0], [d0, d1, big_int(30)], [numel, 0],
        ])
        header[name]["shape"] = value
        return st_pack(header, body), f"shape of {name} = {short(value)} (was {shape})"


class HeaderOffsets(HeaderMutator):
    name = "header.offsets"

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        names = tensor_names(header)
        name = pick_tensor(header, rng)
        s, e = header[name]["data_offsets"]
        size = e - s
        same = [n for n in names if n != name and header[n]["data_offsets"][1] - header[n]["data_offsets"][0] == size]
        kind = rng.choice(["overlap", "shift", "reversed", "negative", "huge", "three", "strings", "floats",
                           "null", "beyond", "single", "bigint", "empty_overlap", "bools"])
        value: Any = {
            "overlap": list(header[rng.choice(same)]["data_offsets"]) if same else [max(0, s - 4), e - 4],
            "shift": [s + 4, e + 4], "reversed": [e, s], "negative": [-8, size - 8], "huge": [2**63, 2**63 + size],
            "three": [s, e, e], "strings": [str(s), str(e)], "floats": [float(s), float(e)], "null": None,
            "beyond": [len(body), len(body) + size], "single": [s], "bigint": [s, big_int()],
            "empty_overlap": [s, s], "bools": [False, True],
        }[kind]
        header[name]["data_offsets"] = value
        return st_pack(header, body), f"data_offsets of {name} = {short(value)} ({kind}; was [{s}, {e}])"


class HeaderDeepNesting(HeaderMutator):
    name = "header.deep_nesting"

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        depth = rng.choice([65, 1000, 10000, 100000])
        where = rng.choice(["metadata_value", "tensor_field", "top_key", "shape", "wrapper", "metadata"])
        deep = nested(depth, rng.choice(["list", "dict"]))
        name = pick_tensor(header, rng)
        if where == "metadata_value":
            header.setdefault("__metadata__", {})["deep"] = deep
        elif where == "metadata":
            header["__metadata__"] = deep
        elif where == "tensor_field":
            header[name]["extra"] = deep
        elif where == "top_key":
            header["zzz"] = deep
        elif where == "shape":
            header[name]["shape"] = deep
        else:
            return st_pack("[" * depth + dumps(header) + "]" * depth, body), f"header wrapped in {depth} lists"
        return st_pack(header, body), f"depth-{depth} nesting at {where} ({name})"


class HeaderSurrogate(HeaderMutator):
    name = "header.surrogate"

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        name = pick_tensor(header, rng)
        bad = rng.choice(["\udc80", "\ud800", "\udfff"])
        where = rng.choice(["key", "key_prefix", "metadata_value", "metadata_key", "dtype", "raw_invalid_utf8"])
        if where in ("key", "key_prefix"):
            new = name.replace(".weight", bad + ".weight") if where == "key" else bad + name
            header = {(new if k == name else k): v for k, v in header.items()}
        elif where == "metadata_value":
            header.setdefault("__metadata__", {})["note"] = "x" + bad
        elif where == "metadata_key":
            header.setdefault("__metadata__", {})["k" + bad] = "v"
        elif where == "dtype":
            header[name]["dtype"] = "F32" + bad
        else:
            text = dumps(header).encode()
            raw = text.replace(name.encode(), name.encode().replace(b".weight", b"\xff\xfe.weight"), 1)
            return st_pack(raw, body), f"raw invalid UTF-8 bytes in key {name}"
        return st_pack(header, body), f"lone surrogate {bad.encode('unicode_escape').decode()} in {where} ({name})"


class HeaderDuplicateKeys(HeaderMutator):
    name = "header.duplicate_keys"

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        names = tensor_names(header)
        name = pick_tensor(header, rng)
        other = rng.choice(names)
        kind = rng.choice(["same_entry", "other_entry", "metadata", "field"])
        text = dumps(header)
        assert text.endswith("}")
        if kind == "same_entry":
            extra = f", {json.dumps(name)}: {json.dumps(header[name])}"
        elif kind == "other_entry":
            extra = f", {json.dumps(name)}: {json.dumps(header[other])}"
        elif kind == "metadata":
            extra = ', "__metadata__": {"format": "pt", "second": "1"}'
        else:
            entry = json.dumps(header[name])[:-1] + ', "shape": [1, 1]}'
            extra = f", {json.dumps(name)}: {entry}"
        return st_pack(text[:-1] + extra + "}", body), f"duplicate key {name} ({kind})"


class HeaderZeroSize(HeaderMutator):
    name = "header.zero_size"

    def mutate_bytes(self, data, rng):
        meta, tensors = st_tensors(data)
        lora_a = [n for n in tensors if "lora_A" in n or "lora_down" in n]
        name = rng.choice(lora_a or list(tensors))
        kind = rng.choice(["rank0_pair", "A_only", "rows0_B", "empty_1d", "all_zero_size"])
        dtype, shape, _ = tensors[name]
        other = partner_name(name)
        if kind == "rank0_pair" and other in tensors:
            tensors[name] = [dtype, [0, *shape[1:]], b""]
            o_dtype, o_shape, _ = tensors[other]
            tensors[other] = [o_dtype, [o_shape[0], 0, *o_shape[2:]], b""]
        elif kind == "rows0_B" and other in tensors:
            o_dtype, o_shape, _ = tensors[other]
            tensors[other] = [o_dtype, [0, *o_shape[1:]], b""]
        elif kind == "empty_1d":
            tensors[name] = [dtype, [0], b""]
        elif kind == "all_zero_size":
            for n, (dt, sh, _) in list(tensors.items()):
                tensors[n] = [dt, [0, *sh[1:]], b""]
        else:
            tensors[name] = [dtype, [0, *shape[1:]], b""]
        return st_build(meta, tensors), f"zero-size {kind} at {name}"


class HeaderValues(HeaderMutator):
    name = "header.values"

    def mutate_bytes(self, data, rng):
        meta, tensors = st_tensors(data)
        floats = [n for n, (dt, _, _) in tensors.items() if dt in ("F32", "F16", "BF16", "F64")]
        if not floats:
            return data, "no float tensor to fill"
        lora = [n for n in floats if partner_name(n)] or floats
        value = rng.choice([math.nan, math.inf, -math.inf, 1e38, -1e38, 3.4e38, 1e-45, 65504.0, 0.0, 1e30])
        scope = rng.choice(["one_element", "whole_tensor", "every_factor"])
        targets = lora if scope == "every_factor" else [rng.choice(lora)]
        for n in targets:
            dtype, _, raw = tensors[n]
            item = ITEMSIZE[dtype]
            enc = encode_value(value, dtype)
            if scope == "one_element" and raw:
                i = rng.randrange(len(raw) // item)
                raw = raw[:i * item] + enc + raw[(i + 1) * item:]
            else:
                raw = enc * (len(raw) // item)
            tensors[n][2] = raw
        return st_build(meta, tensors), f"{value!r} in {scope} ({targets[0]}{', ...' if len(targets) > 1 else ''})"


class HeaderMetadata(HeaderMutator):
    name = "header.metadata"
    VALUES: tuple[tuple[str, Any], ...] = (
        ("whole", []), ("whole", "x"), ("whole", None), ("whole", 5), ("whole", {"k": 5}),
        ("whole", {"k": {"n": 1}}), ("whole", {"format": "np"}), ("whole", {"": ""}),
        ("whole", {"big": "x" * 1_000_000}), ("whole", {"k": big_int()}),
        ("loratool.manifest", "{not json"), ("loratool.manifest", "[]"), ("loratool.manifest", '{"base": 5}'),
        ("loratool.manifest", "[" * 10000 + "]" * 10000), ("loratool.manifest", '{"schema_version": ' + "9" * 5000 + "}"),
        ("loratool.kohya_layout", "["), ("loratool.kohya_layout", '{"keys": 5}'), ("loratool.kohya_layout", "[]"),
        ("loratool.kohya_layout", '{"no_format_metadata": "yes", "keys": {"a": 1}}'),
        ("lora_adapter_metadata", "{not json"), ("lora_adapter_metadata", "[]"),
        ("lora_adapter_metadata", '{"unet.r": true, "unet.lora_alpha": "8"}'),
        ("lora_adapter_metadata", "[" * 10000 + "]" * 10000),
        ("lora_adapter_metadata", '{"unet.rank_pattern": {"[": 2}, "unet.r": ' + "9" * 5000 + "}"),
        ("ss_network_alpha", "NaN"), ("ss_network_alpha", "-1"), ("ss_network_alpha", "1e999"),
        ("ss_network_alpha", "abc"), ("ss_network_dim", "0"), ("ss_network_dim", "-4"), ("ss_network_dim", "x"),
        ("ss_network_args", "{"), ("ss_network_args", '{"conv_dim": "x", "conv_alpha": "nan"}'),
        ("ss_network_args", "[" * 10000 + "]" * 10000), ("format", "\udc80"),
    )

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        key, value = rng.choice(self.VALUES)
        if key == "whole":
            header["__metadata__"] = value
        else:
            meta = header.get("__metadata__")
            header["__metadata__"] = dict(meta) if isinstance(meta, dict) else {}
            header["__metadata__"][key] = value
        header = {"__metadata__": header.pop("__metadata__"), **header}
        return st_pack(header, body), f"__metadata__ {key} = {short(value)}"


class HeaderStructure(HeaderMutator):
    name = "header.structure"

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        text = dumps(header)
        kind = rng.choice(["list", "string", "number", "null", "empty_object", "metadata_only", "nul_padding",
                           "bom", "trailing_garbage", "whitespace_only", "two_objects", "leading_spaces"])
        raw: Any = {
            "list": "[]", "string": '"x"', "number": "5", "null": "null", "empty_object": "{}",
            "metadata_only": '{"__metadata__": {"format": "pt"}}', "bom": "\ufeff" + text,
            "trailing_garbage": text + " junk", "whitespace_only": " " * 64, "two_objects": text + text,
            "leading_spaces": " " * 16 + text,
        }.get(kind)
        if kind == "nul_padding":
            raw = text.encode()
            raw += b"\x00" * (8 - len(raw) % 8)  # 1-8 NUL bytes where spaces belong
            return st_pack(raw, body), "header padded with NUL bytes"
        return st_pack(raw.encode("utf-8"), body), f"header JSON is {kind}"


class HeaderManyTensors(HeaderMutator):
    name = "header.many_tensors"

    def mutate_bytes(self, data, rng):
        meta, tensors = st_tensors(data)
        name = next(iter(tensors))
        dtype = tensors[name][0] if tensors[name][0] in ("F32", "F16", "BF16") else "F32"
        item = ITEMSIZE[dtype]
        n = rng.choice([200, 500])  # big enough for quadratic work to show; far below the timeout
        prefix = name.split(".lora")[0].rsplit(".", 1)[0] if ".lora" in name else "lora_unet_fuzz"
        kind = rng.choice(["rank1_modules", "zero_size_modules", "non_lora"])
        for i in range(n):
            if kind == "non_lora":
                tensors[f"extra.tensor.{i}"] = [dtype, [2], b"\x00" * (2 * item)]
                continue
            if "lora_down" in name:
                a, b = f"{prefix}_fuzz{i}.lora_down.weight", f"{prefix}_fuzz{i}.lora_up.weight"
            else:
                a, b = f"{prefix}.fuzz{i}.lora_A.weight", f"{prefix}.fuzz{i}.lora_B.weight"
            if kind == "rank1_modules":
                tensors[a] = [dtype, [1, 4], encode_value(0.5, dtype) * 4]
                tensors[b] = [dtype, [4, 1], encode_value(0.25, dtype) * 4]
            else:
                tensors[a] = [dtype, [0, 4], b""]
                tensors[b] = [dtype, [4, 0], b""]
        return st_build(meta, tensors), f"{n} extra {kind} tensors"


class HeaderKeyNames(HeaderMutator):
    name = "header.key_names"

    def mutate_bytes(self, data, rng):
        meta, tensors = st_tensors(data)
        name = rng.choice([n for n in tensors if partner_name(n)] or list(tensors))
        kind = rng.choice(["empty", "long", "dotdot", "newline_ansi", "bare", "trailing_space", "case",
                           "no_weight_suffix", "slash", "nul", "homoglyph"])
        new = {
            "empty": "", "long": name.replace(".weight", "x" * 20000 + ".weight"),
            "dotdot": "../" * 8 + name, "newline_ansi": name.replace(".", "\n\x1b[31m.", 1),
            "bare": "lora_A.weight" if "lora_A" in name else "lora_down.weight",
            "trailing_space": name + " ", "case": name.replace("lora_", "LORA_"),
            "no_weight_suffix": name.replace(".weight", ""), "slash": name.replace(".", "/"),
            "nul": name.replace(".weight", "\x00.weight"), "homoglyph": name.replace("o", "\u043e", 1),
        }[kind]
        tensors = {(new if k == name else k): v for k, v in tensors.items()}
        return st_build(meta, tensors), f"key {name} renamed ({kind})"


class HeaderDtypeSwap(HeaderMutator):
    name = "header.dtype_swap"

    def mutate_bytes(self, data, rng):
        header, body = st_split(data)
        name = pick_tensor(header, rng)
        dtype, shape = header[name]["dtype"], header[name]["shape"]
        item = ITEMSIZE.get(dtype, 4)
        options = [d for d in ITEMSIZE if d != dtype]
        new = rng.choice(options)
        numel = math.prod(shape)
        nbytes = numel * item
        if nbytes % ITEMSIZE[new]:
            new = "U8"
        new_numel = nbytes // ITEMSIZE[new]
        new_shape = [*shape[:-1], shape[-1] * item // ITEMSIZE[new]] if shape and (shape[-1] * item) % ITEMSIZE[new] == 0 \
            else [new_numel]
        header[name]["dtype"], header[name]["shape"] = new, new_shape
        return st_pack(header, body), f"{name} reinterpreted {dtype}{shape} -> {new}{new_shape}"


# -- config ---------------------------------------------------------------------------------------

ODD_NUMBERS = (True, False, "16", 1e300, -1, 0, math.nan, math.inf, -math.inf, big_int(), None, [8], {"v": 8},
               8.5, 2**64, 1e-300, -0.0, 2**31, Raw("1e400"), Raw("-0"), 10**9, big_int(4299))


class ConfigMutator(Mutator):
    family = "config"
    sources = tuple(PEFT_ADAPTERS)

    def mutate(self, ws, command, rng):
        path = ws.adapter_config()
        config = json.loads(path.read_text())
        result = self.mutate_config(config, rng, ws)
        if isinstance(result, tuple):
            payload, detail = result
            if isinstance(payload, bytes):
                path.write_bytes(payload)
            elif payload is not None:
                path.write_text(payload, encoding="utf-8", errors="surrogatepass")
        else:
            detail = result
        return f"{ws.adapter_name}: {detail}"

    def mutate_config(self, config: dict, rng: Random, ws: Workspace) -> tuple[Any, str] | str:
        raise NotImplementedError


class ConfigField(ConfigMutator):
    """Set one field to an odd value (the field and the values per subclass)."""

    fields: tuple[str, ...] = ()
    values: tuple[Any, ...] = ()

    def mutate_config(self, config, rng, ws):
        field = rng.choice(self.fields)
        value = rng.choice(self.values)
        if value is DELETE:
            config.pop(field, None)
        else:
            config[field] = value
        return dumps(config), f"{field} = {short(value)}"


DELETE = object()


class ConfigRank(ConfigField):
    name = "config.r"
    fields = ("r",)
    values = (*ODD_NUMBERS, DELETE)


class ConfigAlpha(ConfigField):
    name = "config.lora_alpha"
    fields = ("lora_alpha",)
    values = (*ODD_NUMBERS, DELETE)


class ConfigTargetModules(ConfigField):
    name = "config.target_modules"
    fields = ("target_modules",)
    values = (5, "[", "(", "*", "(a+)+$", "", [], [5], None, {"q_proj": 1}, ["q_proj", None], "all-linear",
              [f"model.layers.{i}.self_attn.q_proj" for i in range(1000)], ["\udc80"], "q_proj", [[["q_proj"]]],
              ["model.layers.0.self_attn.q_proj"] * 1000, "(?P<x", "\\", nested(10000), DELETE, True)


class ConfigExcludeModules(ConfigField):
    name = "config.exclude_modules"
    fields = ("exclude_modules",)
    values = (5, "[", ["q_proj"], {"x": 1}, [5], ".*", True, ["\udc80"], "(?P<", "q_proj", [None], 1.5,
              [f"layers.{i}" for i in range(1000)])


class ConfigPatterns(ConfigMutator):
    name = "config.patterns"
    KEYS = ("", "[", "(", "\udc80", "^(.*)$", ".*", "q_proj", "model.layers.0.self_attn.q_proj", "*", "\\",
            "layers.0", "(?P<x", "\x00", "a" * 10000)
    VALUES = (-1, 0, "8", True, None, math.nan, 1e300, [8], big_int(), 2.5, 10**6, math.inf, {"r": 2}, 4)

    def mutate_config(self, config, rng, ws):
        field = rng.choice(["rank_pattern", "alpha_pattern"])
        kind = rng.choice(["odd_entries", "many_keys", "not_a_dict", "huge_values"])
        if kind == "odd_entries":
            value: Any = {rng.choice(self.KEYS): rng.choice(self.VALUES) for _ in range(rng.randint(1, 4))}
        elif kind == "many_keys":
            n = rng.choice([1000, 5000])
            value = {f"model.layers.{i % 2}.self_attn.q_proj{'' if i < 2 else i}": 4 for i in range(n)}
        elif kind == "huge_values":
            value = {"q_proj": 10**12, "v_proj": 2**63}
        else:
            value = rng.choice([[], "q_proj", 5, None, [["q_proj", 4]], True])
        config[field] = value
        return dumps(config), f"{field} = {short(value)} ({kind})"


class ConfigStrings(ConfigField):
    name = "config.strings"
    fields = ("base_model_name_or_path", "revision", "task_type")
    values = (5, [], {}, True, None, "\x1b[2J\x1b[31mred", "\udc80", "a" * 100000, "../../../etc/passwd",
              "hf://x/y", "/dev/zero", "\u0000", "CAUSAL_LM\n", "SEQ_2_SEQ_LM", "x" * 300, "name@rev:tag",
              nested(10000), big_int())


class ConfigFlags(ConfigField):
    name = "config.flags"
    fields = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "inference_mode", "init_lora_weights", "bias")
    values = ("yes", 1, None, [], "false", 2, {}, True, "all", "lora_only", math.nan)


class ConfigPeftType(ConfigField):
    name = "config.peft_type"
    fields = ("peft_type",)
    values = (5, None, "lora", "LORA\u0000", "LoRA", "", DELETE, "LOHA", "LOKR", ["LORA"])


class ConfigMisc(ConfigField):
    name = "config.misc"
    fields = ("modules_to_save", "layers_to_transform", "layers_pattern", "layer_replication",
              "trainable_token_indices", "target_parameters", "megatron_config", "lora_dropout", "loftq_config")
    values = (5, ["lm_head"], ["\udc80"], "x", [-1], [10**6], [[0, 10**6]], {"embed_tokens": [-1]},
              ["x.weight"], math.nan, {"k": nested(100)}, ["model.embed_tokens"], {"embed_tokens": big_int()})


class ConfigEncoding(ConfigMutator):
    name = "config.encoding"

    def mutate_config(self, config, rng, ws):
        kind = rng.choice(["latin1", "ff_fe_start", "utf16", "utf8_bom", "control_char", "nul_end",
                           "bad_continuation", "cesu8_surrogate", "utf32"])
        config["base_model_name_or_path"] = "modèle"
        text = json.dumps(config, ensure_ascii=False)
        data = {
            "latin1": text.encode("latin-1"),
            "ff_fe_start": b"\xff\xfe" + text.encode(),
            "utf16": text.encode("utf-16"),
            "utf8_bom": b"\xef\xbb\xbf" + text.encode(),
            "control_char": text.replace("modèle", "mod\x01le").encode(),
            "nul_end": text.encode() + b"\x00",
            "bad_continuation": text.replace("modèle", "mod\udcc3(le").encode("utf-8", "surrogateescape"),
            "cesu8_surrogate": text.replace("modèle", "mod\udced\udcb2\udc80le").encode("utf-8", "surrogateescape"),
            "utf32": text.encode("utf-32"),
        }[kind]
        return data, f"adapter_config.json bytes: {kind}"


class ConfigBigInt(ConfigMutator):
    name = "config.bigint"

    def mutate_config(self, config, rng, ws):
        where = rng.choice(["r", "lora_alpha", "zzz", "rank_pattern", "target_modules", "negative_r", "just_under"])
        digits = 5000
        if where == "rank_pattern":
            config["rank_pattern"] = {"q_proj": big_int(digits)}
        elif where == "target_modules":
            config["target_modules"] = [big_int(digits)]
        elif where == "negative_r":
            config["r"] = big_int(digits, negative=True)
        elif where == "just_under":
            config["lora_alpha"] = big_int(4300)
        else:
            config[where] = big_int(digits)
        return dumps(config), f"5000-digit integer at {where}"


class ConfigDeep(ConfigMutator):
    name = "config.deep"

    def mutate_config(self, config, rng, ws):
        depth = rng.choice([65, 1000, 10000, 100000])
        where = rng.choice(["zzz", "rank_pattern", "target_modules", "wrapper", "dicts", "loftq_config"])
        if where == "wrapper":
            return "[" * depth + dumps(config) + "]" * depth, f"config wrapped in {depth} lists"
        config[where if where != "dicts" else "zzz"] = nested(depth, "dict" if where == "dicts" else "list")
        return dumps(config), f"depth-{depth} nesting at {where}"


class ConfigDocument(ConfigMutator):
    name = "config.document"

    def mutate_config(self, config, rng, ws):
        kind = rng.choice(["list", "string", "number", "null", "empty_object", "empty_file", "duplicate_r",
                           "trailing_garbage", "nan_literal", "comments", "whitespace_1mb", "missing_r",
                           "missing_alpha", "missing_targets", "two_documents"])
        text = dumps(config)
        if kind.startswith("missing_"):
            config.pop({"missing_r": "r", "missing_alpha": "lora_alpha", "missing_targets": "target_modules"}[kind])
            return dumps(config), f"{kind}"
        out = {
            "list": "[]", "string": '"x"', "number": "5", "null": "null", "empty_object": "{}", "empty_file": "",
            "duplicate_r": text[:-1] + ', "r": 4}', "trailing_garbage": text + " ]", "nan_literal": "NaN",
            "comments": "// c\n" + text, "whitespace_1mb": " " * 1_000_000 + text, "two_documents": text + text,
        }[kind]
        return out, f"adapter_config.json is {kind}"


class ConfigSpecial(ConfigMutator):
    """Not a regular file: a folder, a link loop, a dangling link, a socket, a link leaving the adapter."""

    name = "config.special"

    def mutate_config(self, config, rng, ws):
        path = ws.adapter_config()
        path.unlink()
        kind = rng.choice(["directory", "link_loop", "dangling_link", "socket", "link_outside", "empty_dir_link"])
        if kind == "directory":
            path.mkdir()
        elif kind == "link_loop":
            os.symlink(path.name, path)
        elif kind == "dangling_link":
            os.symlink("missing.json", path)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(str(path))
            except OSError:  # a path too long for AF_UNIX: a FIFO instead would block, so a folder
                path.mkdir()
                kind = "directory (socket path too long)"
            finally:
                s.close()
        elif kind == "link_outside":
            os.symlink(os.path.relpath(ws.secret, path.parent), path)
        else:
            os.symlink(os.path.relpath(ws.victim, path.parent), path)
        return None, f"adapter_config.json is {kind}"


class ConfigFifo(ConfigMutator):
    name = "config.fifo"

    def mutate_config(self, config, rng, ws):
        path = ws.adapter_config()
        path.unlink()
        os.mkfifo(path)
        return None, "adapter_config.json is a FIFO with no writer"


class ConfigDevZero(ConfigMutator):
    name = "config.devzero"

    def mutate_config(self, config, rng, ws):
        path = ws.adapter_config()
        path.unlink()
        os.symlink("/dev/zero", path)
        return None, "adapter_config.json is a symlink to /dev/zero"


# -- base -----------------------------------------------------------------------------------------


class BaseMutator(Mutator):
    family = "base"
    commands = BASE_COMMANDS
    sources = tuple(LLAMA_ADAPTERS)

    def prepare(self, ws, command, rng):
        ws.use_adapter(rng.choice(self.sources))
        ws.use_base("base_llama")

    def index(self, ws: Workspace) -> tuple[Path, dict]:
        assert ws.base is not None
        p = ws.base / "model.safetensors.index.json"
        return p, json.loads(p.read_text())

    def untouched(self, ws: Workspace, index: dict, rng: Random) -> str:
        names = sorted(n for n in index["weight_map"] if "norm" in n or "embed" in n or "lm_head" in n)
        return rng.choice(names)

    def victim_shard(self, ws: Workspace, shard: Path) -> Path:
        """A copy of ``shard`` in ROOT/victim whose metadata and raw-copied tensors carry the token."""
        meta, tensors = st_tensors(shard.read_bytes())
        meta = dict(meta or {})
        meta["secret"] = ws.token.decode()
        for name, t in tensors.items():
            if "norm" in name or "embed" in name or "lm_head" in name:
                t[2] = (ws.token * (len(t[2]) // len(ws.token) + 1))[:len(t[2])]
        dest = ws.victim / "x.safetensors"
        dest.write_bytes(st_build(meta, tensors))
        return dest


class BaseEscapeRelative(BaseMutator):
    name = "base.escape_relative"

    def mutate(self, ws, command, rng):
        p, index = self.index(ws)
        target = rng.choice(["one_tensor", "whole_shard"])
        entry = rng.choice(["../victim/x.safetensors", "./../victim/x.safetensors",
                            "sub/../../victim/x.safetensors", "../base/../victim/x.safetensors",
                            "../../" + ws.root.name + "/victim/x.safetensors"])
        name = self.untouched(ws, index, rng)
        shard = ws.base / index["weight_map"][name]
        self.victim_shard(ws, shard)
        if target == "one_tensor":
            index["weight_map"][name] = entry
        else:
            old = index["weight_map"][name]
            for k, v in index["weight_map"].items():
                if v == old:
                    index["weight_map"][k] = entry
        p.write_text(json.dumps(index))
        return f"weight_map {target} ({name}) -> {entry!r}"


class BaseEscapeAbsolute(BaseMutator):
    name = "base.escape_absolute"

    def mutate(self, ws, command, rng):
        p, index = self.index(ws)
        name = self.untouched(ws, index, rng)
        victim = self.victim_shard(ws, ws.base / index["weight_map"][name])
        entry = rng.choice([str(victim), "/" + str(victim).lstrip("/"), str(ws.base / index["weight_map"][name])])
        index["weight_map"][name] = entry
        p.write_text(json.dumps(index))
        return f"weight_map {name} -> absolute {entry.replace(str(ws.root), '$ROOT')!r}"


class BaseSymlinkShard(BaseMutator):
    name = "base.symlink_shard"

    def mutate(self, ws, command, rng):
        shard = rng.choice(ws.base_shards())
        victim = self.victim_shard(ws, shard)
        kind = rng.choice(["relative_out", "absolute_out", "inside"])
        shard.unlink()
        if kind == "relative_out":
            os.symlink(os.path.relpath(victim, shard.parent), shard)
        elif kind == "absolute_out":
            os.symlink(victim, shard)
        else:  # a link that stays inside the base (Hugging Face cache style): must work
            real = shard.parent / ("blob-" + shard.name)
            real.write_bytes(ws.fixtures.files["base_llama"][shard.name])
            os.symlink(real.name, shard)
        return f"{shard.name} is a symlink ({kind})"


class BaseSymlinkExtra(BaseMutator):
    name = "base.symlink_extra"

    def mutate(self, ws, command, rng):
        fname = rng.choice(["tokenizer.json", "generation_config.json", "tokenizer_config.json",
                            "special_tokens_map.json", "tokenizer.model", "config.json"])
        kind = rng.choice(["secret_relative", "secret_absolute", "dir_outside", "dangling"])
        p = ws.base / fname
        if p.exists():
            p.unlink()
        target = {"secret_relative": os.path.relpath(ws.secret, ws.base), "secret_absolute": str(ws.secret),
                  "dir_outside": os.path.relpath(ws.victim, ws.base), "dangling": "nowhere.json"}[kind]
        os.symlink(target, p)
        return f"{fname} is a symlink ({kind})"


class BaseMissing(BaseMutator):
    name = "base.missing"

    def mutate(self, ws, command, rng):
        kind = rng.choice(["shard", "shard", "index", "config", "all_shards"])
        if kind == "shard":
            shard = rng.choice(ws.base_shards())
            shard.unlink()
            return f"{shard.name} deleted (the index lists it)"
        if kind == "all_shards":
            for s in ws.base_shards():
                s.unlink()
            return "every shard deleted"
        name = "model.safetensors.index.json" if kind == "index" else "config.json"
        (ws.base / name).unlink()
        return f"{name} deleted"


class BaseConfigJson(BaseMutator):
    name = "base.config_json"

    def mutate(self, ws, command, rng):
        p = ws.base / "config.json"
        config = json.loads(p.read_text())
        kind = rng.choice(["latin1", "not_json", "deep", "bigint", "list", "architectures", "hidden_size",
                           "dtype", "surrogate", "empty"])
        if kind == "latin1":
            config["model_type"] = "llamà"
            p.write_bytes(json.dumps(config, ensure_ascii=False).encode("latin-1"))
        elif kind == "not_json":
            p.write_text('{"model_type": ')
        elif kind == "deep":
            config["zzz"] = nested(10000)
            p.write_text(dumps(config))
        elif kind == "bigint":
            config["vocab_size"] = big_int()
            p.write_text(dumps(config))
        elif kind == "list":
            p.write_text("[]")
        elif kind == "empty":
            p.write_text("")
        else:
            value = {"architectures": 5, "hidden_size": "64", "dtype": "float128", "surrogate": "\udc80"}[kind]
            config["architectures" if kind == "architectures" else "model_type" if kind == "surrogate" else kind] = value
            p.write_text(dumps(config))
        return f"base config.json: {kind}"


class BaseDirInPlace(BaseMutator):
    name = "base.dir_in_place"

    def mutate(self, ws, command, rng):
        fname = rng.choice([s.name for s in ws.base_shards()] + ["config.json", "model.safetensors.index.json",
                                                                  "generation_config.json", "tokenizer.json"])
        p = ws.base / fname
        if p.exists():
            p.unlink()
        p.mkdir()
        (p / "inner.txt").write_text("x")
        return f"{fname} is a folder"


class BaseIndex(BaseMutator):
    name = "base.index"

    def mutate(self, ws, command, rng):
        p, index = self.index(ws)
        names = sorted(index["weight_map"])
        name = rng.choice(names)
        kind = rng.choice(["map_list", "map_null", "entry_int", "map_empty", "not_json", "deep", "surrogate",
                           "config_as_shard", "index_as_shard", "total_size_bigint", "total_size_negative",
                           "missing_entry", "extra_entry", "empty_entry", "dot_entry", "trailing_slash",
                           "wrong_shard", "no_map", "metadata_list"])
        wm = index["weight_map"]
        if kind == "map_list":
            index["weight_map"] = list(wm.items())
        elif kind == "map_null":
            index["weight_map"] = None
        elif kind == "entry_int":
            wm[name] = 5
        elif kind == "map_empty":
            index["weight_map"] = {}
        elif kind == "not_json":
            p.write_text('{"weight_map": {')
            return "index is not JSON"
        elif kind == "deep":
            index["metadata"] = nested(10000)
        elif kind == "surrogate":
            wm[name] = wm[name].replace(".safetensors", "\udc80.safetensors")
        elif kind == "config_as_shard":
            wm[name] = "config.json"
        elif kind == "index_as_shard":
            wm[name] = "model.safetensors.index.json"
        elif kind == "total_size_bigint":
            index["metadata"]["total_size"] = big_int()
        elif kind == "total_size_negative":
            index["metadata"]["total_size"] = -1
        elif kind == "missing_entry":
            del wm[name]
        elif kind == "extra_entry":
            wm["model.layers.9.mlp.fuzz.weight"] = wm[name]
        elif kind == "empty_entry":
            wm[name] = ""
        elif kind == "dot_entry":
            wm[name] = "."
        elif kind == "trailing_slash":
            wm[name] = wm[name] + "/"
        elif kind == "wrong_shard":
            others = sorted({v for v in wm.values() if v != wm[name]})
            wm[name] = rng.choice(others)
        elif kind == "no_map":
            del index["weight_map"]
        else:
            index["metadata"] = []
        p.write_text(dumps(index))
        return f"index: {kind} ({name})"


class BaseShardHeader(BaseMutator):
    name = "base.shard_header"
    INNER = ("HeaderByteFlip", "HeaderTruncate", "HeaderLengthLie", "HeaderDtype", "HeaderShape", "HeaderOffsets",
             "HeaderDuplicateKeys", "HeaderValues", "HeaderMetadata", "HeaderSurrogate", "HeaderDtypeSwap")

    def mutate(self, ws, command, rng):
        shard = rng.choice(ws.base_shards())
        inner = globals()[rng.choice(self.INNER)]()
        data, detail = inner.mutate_bytes(shard.read_bytes(), rng)
        shard.write_bytes(data)
        return f"{shard.name}: {inner.name}: {detail}"


class BaseShapes(BaseMutator):
    name = "base.shapes"

    def mutate(self, ws, command, rng):
        shard = rng.choice(ws.base_shards())
        meta, tensors = st_tensors(shard.read_bytes())
        proj = [n for n in tensors if n.endswith("proj.weight")] or list(tensors)
        name = rng.choice(proj)
        dtype, shape, raw = tensors[name]
        kind = rng.choice(["half_rows", "transposed", "one_dim", "float32"])
        if kind == "half_rows":
            tensors[name] = [dtype, [shape[0] // 2, *shape[1:]], raw[:len(raw) // 2]]
        elif kind == "transposed":
            tensors[name] = [dtype, shape[::-1], raw]
        elif kind == "one_dim":
            tensors[name] = [dtype, [math.prod(shape)], raw]
        else:
            tensors[name] = ["F32", shape, b"".join(raw[i:i + 2].rjust(4, b"\x00") for i in range(0, len(raw), 2))]
        shard.write_bytes(st_build(meta, tensors))
        return f"{shard.name}: {name} {kind}"


class BaseFifo(BaseMutator):
    name = "base.fifo"

    def mutate(self, ws, command, rng):
        fname = rng.choice(["tokenizer.json", "generation_config.json", "config.json",
                            "model.safetensors.index.json"] + [s.name for s in ws.base_shards()])
        p = ws.base / fname
        if p.exists():
            p.unlink()
        os.mkfifo(p)
        return f"{fname} is a FIFO with no writer"


class BaseExtraFiles(BaseMutator):
    name = "base.extra_files"

    def mutate(self, ws, command, rng):
        kind = rng.choice(["sparse_tokenizer", "newline_name", "dash_name", "hidden", "nested_dir", "many_files",
                           "non_utf8_name"])
        if kind == "sparse_tokenizer":
            with open(ws.base / "tokenizer.model", "wb") as f:
                f.truncate(64 << 20)  # 64 MiB of holes: costs no disk until copied
        elif kind == "newline_name":
            (ws.base / "a\nb.json").write_text("{}")
        elif kind == "non_utf8_name":
            (ws.base / "tok\udcffenizer.json").write_text("{}")
        elif kind == "dash_name":
            (ws.base / "-rf").write_text("x")
        elif kind == "hidden":
            (ws.base / ".secret").write_bytes(ws.token)
        elif kind == "nested_dir":
            (ws.base / "sub" / "deeper").mkdir(parents=True)
            (ws.base / "sub" / "deeper" / "model-00001-of-00004.safetensors").write_bytes(b"not a shard")
        else:
            for i in range(200):  # every extra file is copied (and synced): linear, so 200 will do
                (ws.base / f"extra_{i}.json").write_text("{}")
        return f"base holds extra files: {kind}"


# -- path, layout, manifest -----------------------------------------------------------------------


class PathNames(Mutator):
    """The adapter's own name: spaces, the compose separators ':' and ',', registry-reference
    look-alikes, a newline, an escape sequence, bytes that are not UTF-8 (passed on as Python
    passes them: surrogate escapes)."""

    family, name = "path", "path.names"
    NAMES = ("ad apter", "adapter:0.5", "a,b", "adapter\nx", "ad\udcffapter", "\u00e4dapter", "x" * 200,
             "sha256:00", "fuzz@1", "fuzz:prod", "hf:x", "~adapter", "$HOME", "a'b\"c", "\x1b[31mred",
             "adapter.safetensors", "adapter.bin", ".hidden", "adapter.")

    def mutate(self, ws, command, rng):
        assert ws.adapter is not None
        name = rng.choice(self.NAMES)
        if ws.adapter.is_file() and name != "adapter.bin" and not name.endswith(".safetensors"):
            name += ".safetensors"
        new = ws.root / name
        ws.adapter.rename(new)
        ws.adapter = new
        return f"{ws.adapter_name} renamed {name!r}"


class AdapterLayout(Mutator):
    """What sits beside a PEFT adapter's two files."""

    family, name = "layout", "layout.peft_dir"
    sources = tuple(PEFT_ADAPTERS)

    def mutate(self, ws, command, rng):
        assert ws.adapter is not None
        st = ws.adapter / "adapter_model.safetensors"
        kind = rng.choice(["pickle_beside", "second_safetensors", "renamed_weights", "weights_in_subdir",
                           "config_in_subdir", "non_utf8_file_name", "weights_link_inside", "weights_hardlink",
                           "weights_link_outside", "many_files"])
        if kind == "pickle_beside":
            (ws.adapter / "adapter_model.bin").write_bytes(b"\x80\x04\x95" + b"\x00" * 16)
        elif kind == "second_safetensors":
            (ws.adapter / "extra.safetensors").write_bytes(st.read_bytes())
        elif kind == "renamed_weights":
            st.rename(ws.adapter / "model.safetensors")
        elif kind == "weights_in_subdir":
            (ws.adapter / "sub").mkdir()
            st.rename(ws.adapter / "sub" / st.name)
        elif kind == "config_in_subdir":
            (ws.adapter / "sub").mkdir()
            (ws.adapter / "adapter_config.json").rename(ws.adapter / "sub" / "adapter_config.json")
        elif kind == "non_utf8_file_name":
            (ws.adapter / "n\udcffotes.json").write_text("{}")
        elif kind == "weights_link_inside":
            st.rename(ws.adapter / "blob")
            os.symlink("blob", st)
        elif kind == "weights_hardlink":
            os.link(st, ws.victim / "hardlinked.safetensors")
        elif kind == "weights_link_outside":  # the real file carries the token: found in an output, a leak
            real = ws.victim / "weights.safetensors"
            header, body = st_split(st.read_bytes())
            header["__metadata__"] = {**(header.get("__metadata__") or {}), "secret": ws.token.decode()}
            real.write_bytes(st_pack(header, body))
            st.unlink()
            os.symlink(os.path.relpath(real, st.parent), st)
        else:
            for i in range(200):
                (ws.adapter / f"note_{i}.txt").write_text("x")
        return f"{ws.adapter_name}: {kind}"


class ManifestMutator(Mutator):
    """loratool.json beside the adapter (written by `loratool manifest` in the case's setup, then
    damaged): odd values anywhere in it, odd documents, a FIFO, links to /dev/zero or out."""

    family, name = "manifest", "manifest.loratool_json"
    sources = ("llama_r8", "llama_r8_bf16", "llama_rslora_patterns", "gpt2_conv1d")
    VALUES = (None, 5, "x", [], {}, True, -1, 1e308, math.nan, big_int(), nested(1000), "\udc80",
              "../victim/x.safetensors", "/etc/passwd", 2**70, "", "sha256:zz", [None], {"path": 5})

    def prepare(self, ws, command, rng):
        super().prepare(ws, command, rng)
        if ws.base is None:
            ws.use_base()
        ws.setup.append(["manifest", str(ws.adapter), "--base", str(ws.base)])

    def mutate(self, ws, command, rng):
        kind = rng.choice(["field", "field", "field", "document", "special"])
        choice = rng.random()  # drawn now: the damage happens after the setup ran
        value = rng.choice(self.VALUES)
        doc = rng.choice(["not_json", "list", "deep", "bigint", "empty", "latin1", "other_kind", "schema_2"])
        special = rng.choice(["fifo", "devzero", "link_outside", "directory"])

        def damage() -> str:
            path = ws.adapter / "loratool.json"
            data = json.loads(path.read_text())
            if kind == "field":
                slots = list(_slots(data))
                where, parent, key = slots[int(choice * len(slots))]
                parent[key] = value
                path.write_text(dumps(data))
                return f"loratool.json {where} = {short(value)}"
            if kind == "document":
                if doc == "latin1":
                    data["adapter"]["base_model"] = "modèle"
                text = {"not_json": '{"kind": ', "list": "[]", "deep": "[" * 10000 + "]" * 10000,
                        "bigint": dumps(dict(data, schema_version=big_int())), "empty": "",
                        "other_kind": dumps(dict(data, kind="other")), "schema_2": dumps(dict(data, schema_version=2)),
                        }.get(doc)
                if doc == "latin1":
                    path.write_bytes(json.dumps(data, ensure_ascii=False).encode("latin-1"))
                else:
                    path.write_text(text)
                return f"loratool.json is {doc}"
            path.unlink()
            if special == "fifo":
                os.mkfifo(path)
            elif special == "devzero":
                os.symlink("/dev/zero", path)
            elif special == "link_outside":
                os.symlink(os.path.relpath(ws.secret, path.parent), path)
            else:
                path.mkdir()
            return f"loratool.json is {special}"

        ws.after_setup.append(damage)
        return f"{ws.adapter_name} with a manifest of its base, then"


def _slots(node, where: str = ""):
    """(path, container, key) of every value in a JSON tree, in document order."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        here = f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]"
        yield here, node, key
        yield from _slots(value, here)


# -- dest -----------------------------------------------------------------------------------------


class DestMutator(Mutator):
    """The -o path. Subclasses set ``target(ws, command, rng)``; ``overwrite`` makes the twin."""

    family = "dest"
    commands = OUTPUT_COMMANDS
    overwrite = False
    base_name = ""

    def prepare(self, ws, command, rng):
        ws.use_adapter("llama_r8")
        if command in NEEDS_PARTNER:
            ws.use_partner()
        if command in NEEDS_BASE:
            ws.use_base("base_llama")

    def mutate(self, ws, command, rng):
        ws.overwrite = self.overwrite
        detail = self.target(ws, command, rng)
        return detail + (" with --overwrite" if self.overwrite else "")

    def target(self, ws: Workspace, command: str, rng: Random) -> str:
        raise NotImplementedError


class DestInput(DestMutator):
    base_name = "dest.input"

    def target(self, ws, command, rng):
        choices = [("adapter", ws.adapter)]
        if ws.base is not None:
            choices.append(("base", ws.base))
        if ws.adapter2 is not None:
            choices.append(("adapter2", ws.adapter2))
        what, ws.out = rng.choice(choices)
        return f"-o is the input {what}"


class DestParent(DestMutator):
    base_name = "dest.parent"

    def target(self, ws, command, rng):
        ws.out = ws.root
        return "-o is the folder holding the inputs"


class DestInside(DestMutator):
    base_name = "dest.inside"

    def target(self, ws, command, rng):
        choices = [ws.adapter / "adapter_model.safetensors", ws.adapter / "adapter_config.json",
                   ws.adapter / "new_output"]
        if ws.base is not None:
            choices += [ws.base / "model-00001-of-00004.safetensors", ws.base / "config.json", ws.base / "merged"]
        ws.out = rng.choice(choices)
        return f"-o is {ws.out.relative_to(ws.root)} (inside an input)"


class DestHome(DestMutator):
    base_name = "dest.home"

    def target(self, ws, command, rng):
        ws.protect_home = True
        ws.setup.append(["registry", "add", str(ws.adapter), "--name", "kept"])
        ws.out = rng.choice([ws.home, ws.home / "blobs"])
        return f"-o is {ws.out.relative_to(ws.root)} ($LORATOOL_HOME holding a registry)"


class DestDangling(DestMutator):
    base_name = "dest.dangling_link"

    def target(self, ws, command, rng):
        ws.out = ws.default_out(command)
        kind = rng.choice(["relative", "absolute"])
        target = ws.victim / "new_output"
        os.symlink(os.path.relpath(target, ws.out.parent) if kind == "relative" else target, ws.out)
        return f"-o is a dangling {kind} symlink to victim/new_output"


class DestDirLink(DestMutator):
    base_name = "dest.dir_link"

    def target(self, ws, command, rng):
        ws.out = ws.default_out(command)
        os.symlink(os.path.relpath(ws.victim, ws.out.parent), ws.out)
        return "-o is a symlink to the victim folder"


class DestFileLink(DestMutator):
    base_name = "dest.file_link"

    def target(self, ws, command, rng):
        ws.out = ws.default_out(command)
        os.symlink(ws.secret, ws.out)
        return "-o is a symlink to secret/secret.txt"


class DestFifo(DestMutator):
    base_name = "dest.fifo"

    def target(self, ws, command, rng):
        ws.out = ws.default_out(command)
        os.mkfifo(ws.out)
        return "-o is a FIFO with no reader"


class DestDevNode(DestMutator):
    """-o is a character device. As root, never a real one: a null device node made inside the
    case folder (os.mknod), or the case is SKIPPED (counted, with the reason)."""

    base_name = "dest.device"

    def target(self, ws, command, rng):
        if os.geteuid() != 0:
            ws.out = Path("/dev/null")
            return "-o is /dev/null"
        ws.out = ws.default_out(command)
        try:
            os.mknod(ws.out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except OSError as e:
            ws.skip = f"running as root and os.mknod is refused here ({e.strerror}); a real device is never used"
            return "-o is a device node (not made)"
        return "-o is a character device node (1,3) made in OUT"


class DestExistingFile(DestMutator):
    base_name = "dest.existing_file"

    def target(self, ws, command, rng):
        ws.out = ws.default_out(command)
        ws.out.write_text("an older unrelated file\n")
        return "-o is an existing unrelated file"


class DestForeignDir(DestMutator):
    base_name = "dest.foreign_dir"

    def target(self, ws, command, rng):
        kind = rng.choice(["result_with_keep", "out_itself"])
        if kind == "out_itself":
            ws.out = ws.out_dir
            return "-o is OUT itself (holds victim/keep.txt)"
        ws.out = ws.out_dir / "result"
        ws.out.mkdir()
        keep = ws.out / "keep.txt"
        keep.write_text("a file the new output does not write\n")
        ws.protected.append(keep)
        return "-o is a folder holding keep.txt"


class DestOddName(DestMutator):
    base_name = "dest.odd_name"
    NAMES = ("r esult", "result:1", "a,b", "result\n", "r\udcffesult", "r\u00e9sult", "x" * 250, ".result",
             "result.safetensors", "-result")

    def target(self, ws, command, rng):
        name = rng.choice(self.NAMES)
        ws.out = ws.out_dir / name
        return f"-o is OUT/{name!r}"


def _dest_variants() -> list[Mutator]:
    out: list[Mutator] = []
    for cls in (DestInput, DestParent, DestInside, DestHome, DestDangling, DestDirLink, DestFileLink,
                DestFifo, DestDevNode, DestExistingFile, DestForeignDir, DestOddName):
        for overwrite in (False, True):
            m = cls()
            m.overwrite = overwrite
            m.name = cls.base_name + (".overwrite" if overwrite else "")
            out.append(m)
    return out


def all_mutators() -> list[Mutator]:
    """Every mutation class, in a fixed order (the schedule shuffles it by seed)."""
    fixed: list[Mutator] = [
        Control(),
        HeaderByteFlip(), HeaderTruncate(), HeaderLengthLie(), HeaderDtype(), HeaderShape(), HeaderOffsets(),
        HeaderDeepNesting(), HeaderSurrogate(), HeaderDuplicateKeys(), HeaderZeroSize(), HeaderValues(),
        HeaderMetadata(), HeaderStructure(), HeaderManyTensors(), HeaderKeyNames(), HeaderDtypeSwap(),
        ConfigRank(), ConfigAlpha(), ConfigTargetModules(), ConfigExcludeModules(), ConfigPatterns(),
        ConfigStrings(), ConfigFlags(), ConfigPeftType(), ConfigMisc(), ConfigEncoding(), ConfigBigInt(),
        ConfigDeep(), ConfigDocument(), ConfigSpecial(), ConfigFifo(), ConfigDevZero(),
        BaseEscapeRelative(), BaseEscapeAbsolute(), BaseSymlinkShard(), BaseSymlinkExtra(), BaseMissing(),
        BaseConfigJson(), BaseDirInPlace(), BaseIndex(), BaseShardHeader(), BaseShapes(), BaseFifo(),
        BaseExtraFiles(), PathNames(), AdapterLayout(), ManifestMutator(),
    ]
    return fixed + _dest_variants()
