"""Group-wise integer quantization of the KV cache.

- ``reference``: pure torch quantize / dequantize (2, 3, 4, 8 bits; symmetric or
  not; groups along any axis) and the Hadamard rotation.
- ``packing``: dense bit packing of codes (3 bits as a 2-bit and a 1-bit plane).
- ``store`` / ``cache`` / ``attention``: a transformers ``Cache`` that holds packed codes, scales,
  zero points and a full-precision window (or, for a stream left unquantized, its tokens as they
  came), read causally by perplexity.
- ``routing``: how attention reads the cache (kernels on CUDA, PyTorch elsewhere).
- ``config``: ``KVQuantConfig``, ``MixedKVQuantConfig`` (two precisions per stream: leading
  features at more bits), ``LayerwiseKVQuantConfig`` (a quantizer per layer and kind, or None:
  that stream unquantized); ``stream_config(config, layer, kind)`` reads any of them per stream.
- ``weights``: bitsandbytes int8 / NF4 weights (``quantize_weights``, ``weight_bytes``).
"""

from eigenkv.quant.cache import QuantizedKV, QuantizedKVCache
from eigenkv.quant.config import KVQuantConfig, LayerwiseKVQuantConfig, MixedKVQuantConfig, stream_config
from eigenkv.quant.packing import pack, packed_length, unpack
from eigenkv.quant.reference import dequantize, fake_quantize, hadamard, quantize

__all__ = [
    "KVQuantConfig",
    "LayerwiseKVQuantConfig",
    "MixedKVQuantConfig",
    "QuantizedKV",
    "QuantizedKVCache",
    "dequantize",
    "fake_quantize",
    "hadamard",
    "pack",
    "packed_length",
    "quantize",
    "stream_config",
    "unpack",
]
