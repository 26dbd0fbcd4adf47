"""Quantized bases: bitsandbytes' 4-bit formats (NF4, FP4, double quantization), GPTQ and AWQ, in numpy.

    bnb     quantize/dequantize bit for bit as bitsandbytes 0.50 does on the CPU; ``QuantSpec``
            and ``parse_precision`` (``merge --base-precision``); the quant state's JSON
    stored  ``QuantizedRef``: a 4-bit weight of a checkpoint that transformers saved, read as
            the 16-bit tensor it dequantizes to
    identity  ``verify_derived``: whether a 4-bit base is bitsandbytes' quantization of a 16-bit
            base, bit for bit (``fingerprint --source``)
    gptq    ``PackedRef``: a GPTQ (2/3/4/8-bit, v1/v2 zero points, act-order) or AWQ (GEMM) layer
            read as the 16-bit weight it dequantizes to, bit for bit as GPTQModel, AutoGPTQ and
            AutoAWQ do (``bench/check_gptq_reference.py``)
"""

from __future__ import annotations

from loratool.quant.bnb import QuantSpec, dequantize, parse_precision, quantize_4bit, roundtrip

__all__ = ["QuantSpec", "dequantize", "parse_precision", "quantize_4bit", "roundtrip"]
