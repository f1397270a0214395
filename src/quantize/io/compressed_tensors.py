"""compressed-tensors' "pack-quantized" layout: integer weights as vLLM and transformers load them.

Written from the source of compressed-tensors 0.20.0 (compressors/pack_quantized/base.py and
helpers.py; the package needs torch, so it is not used here). For a Linear weight NAME.weight
of shape (out, in) quantized in groups of `group_size` along `in`, a checkpoint holds

  NAME.weight_packed      int32 (out, ceil(in * bits / 32)): the codes plus 2^(bits-1), as
                          unsigned values, 32/bits per word, element i at bit bits*(i % (32/bits))
                          of word i // (32/bits) (little-endian: the low nibble of the first
                          byte is element 0); a row's unused tail bits are 0.
  NAME.weight_scale       (out, in / group_size), the model's dtype (llm-compressor keeps the
                          weight dtype; so do we); (out, 1) for the "channel" strategy.
  NAME.weight_shape       int64 [out, in].
  NAME.weight_zero_point  asymmetric only: int32 (ceil(out * bits / 32), n_groups), the zero
                          points plus 2^(bits-1), packed the same way along `out` (dim 0).

and w = (q - zero_point) * scale with q in [-2^(bits-1), 2^(bits-1) - 1]. So the formats map
as: int4/int8 -> symmetric (q = our code), uint4/uint8 -> asymmetric (q = code - 2^(bits-1),
zero point likewise), and the stored unsigned values are our uint codes / int codes + 8 (+128).
config.json carries `quantization_config` (`quantization_config()` builds it).
"""

from __future__ import annotations

import numpy as np

from ..packing import pack_nibbles, unpack_nibbles
from ..tensor import QuantizedTensor

#: the compressed-tensors release whose source this layout follows (written into the config)
CT_VERSION = "0.20.0"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")

#: our format -> (num_bits, symmetric)
SCHEMES = {"int4": (4, True), "uint4": (4, False), "int8": (8, True), "uint8": (8, False)}


def scheme(format: str) -> tuple[int, bool]:
    try:
        return SCHEMES[format]
    except KeyError:
        raise ValueError(
            f"the compressed-tensors pack-quantized layout holds integer formats only "
            f"({', '.join(SCHEMES)}), not {format!r}; use layout='quantize' for it"
        ) from None


def format_of(bits: int, symmetric: bool) -> str:
    for name, s in SCHEMES.items():
        if s == (bits, symmetric):
            return name
    raise ValueError(f"no format here for {bits}-bit {'' if symmetric else 'a'}symmetric ints")


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) unsigned values < 2^bits -> (rows, ceil(n * bits / 32)) int32, dense."""
    per = 32 // bits
    u = np.asarray(values, np.uint8)
    rows, n = u.shape
    words = -(-n // per)
    padded = np.zeros((rows, words * per), np.uint8)
    padded[:, :n] = u
    raw = pack_nibbles(padded) if bits == 4 else padded
    return np.ascontiguousarray(raw).view("<i4").astype(np.int32)


def unpack_int32(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_int32`: (rows, words) int32 -> (rows, n) uint8."""
    raw = np.ascontiguousarray(np.asarray(packed).astype("<i4")).view(np.uint8)
    if bits == 4:
        return unpack_nibbles(raw, n, signed=False).view(np.uint8)
    return raw[:, :n].copy()


def representable(shape: tuple[int, ...], block_size: int | None) -> str | None:
    """Why a tensor of `shape` cannot be stored with `block_size` (None: per channel), or None."""
    if len(shape) != 2:
        return f"compressed-tensors pack-quantized stores 2-d weights, this one is {len(shape)}-d"
    if block_size is not None and shape[1] % block_size:
        return (
            f"its {shape[1]} input columns are not a multiple of the group size {block_size}, "
            "which compressed-tensors loaders require"
        )
    return None


def encode(qt: QuantizedTensor, scale_dtype) -> tuple[dict[str, np.ndarray], QuantizedTensor]:
    """The layout's tensors for `qt` (2-d, quantized along axis 1), and `qt` as they store it.

    The scales are stored in `scale_dtype` (the weight's dtype), so the stored tensor is `qt`
    with its scales rounded to it; a scale that would round to 0 is stored as the dtype's
    smallest positive value instead (only blocks of subnormal weights get there).
    """
    bits, symmetric = scheme(qt.format)
    if len(qt.shape) != 2 or qt.axis != 1:
        raise ValueError(
            f"compressed-tensors stores 2-d weights quantized along their last axis, got "
            f"shape {qt.shape}, axis {qt.axis}"
        )
    rows, cols = qt.shape
    codes = qt.codes().reshape(rows, -1)[:, :cols]
    offset = 1 << (bits - 1)
    u = (codes.astype(np.int16) + offset).astype(np.uint8) if symmetric else codes
    dt = np.dtype(scale_dtype)
    scales = qt.scales.astype(dt)
    tiny = np.array(_smallest_positive(dt), dt)
    scales = np.where(scales.astype(np.float64) > 0, scales, tiny).astype(dt)
    if not np.isfinite(scales.astype(np.float64)).all():
        raise ValueError(f"scales overflow {dt}")
    out = {
        "weight_packed": pack_int32(u, bits),
        "weight_scale": np.ascontiguousarray(scales),
        "weight_shape": np.array([rows, cols], np.int64),
    }
    if not symmetric:
        zp = np.ascontiguousarray(qt.zero_points.T)  # (n_groups, rows): packed along rows
        out["weight_zero_point"] = np.ascontiguousarray(pack_int32(zp, bits).T)
    stored = QuantizedTensor(
        data=qt.data,
        scales=out["weight_scale"],
        zero_points=qt.zero_points,
        format=qt.format,
        block_size=qt.block_size,
        axis=qt.axis,
        shape=qt.shape,
        dtype=qt.dtype,
    )
    return out, stored


def _smallest_positive(dt: np.dtype) -> float:
    if dt.kind == "f":
        return float(np.finfo(dt).smallest_subnormal)
    import ml_dtypes

    return float(ml_dtypes.finfo(dt).smallest_subnormal)


def decode(
    pieces: dict[str, np.ndarray],
    bits: int | None = None,
    block_size: int | None = None,
    dtype=None,
) -> QuantizedTensor:
    """A QuantizedTensor from one module's layout tensors (names without the module prefix).

    `bits` comes from the config or our metadata; without it, it is read off the packed width
    (ValueError when 4 and 8 both fit). `block_size` (our metadata) restores a padded block
    that covered a whole row; `dtype` is the original weight dtype (default: the scales').
    Every shape and dtype is checked: ValueError on any mismatch.
    """
    missing = [k for k in ("weight_packed", "weight_scale", "weight_shape") if k not in pieces]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    packed, scale, wshape = (pieces[k] for k in ("weight_packed", "weight_scale", "weight_shape"))
    zp_packed = pieces.get("weight_zero_point")
    if wshape.dtype.kind not in "iu" or wshape.shape != (2,) or (wshape <= 0).any():
        raise ValueError(
            f"weight_shape must be two positive ints, got {wshape.dtype} "
            f"{list(wshape.shape)} starting {wshape.reshape(-1)[:4].tolist()}"
        )
    rows, cols = (int(v) for v in wshape)
    if packed.dtype != np.int32 or packed.ndim != 2 or packed.shape[0] != rows:
        raise ValueError(
            f"weight_packed must be int32 ({rows}, words), got {packed.dtype} {packed.shape}"
        )
    fits = [b for b in (4, 8) if packed.shape[1] == -(-cols * b // 32)]
    if bits is None:
        if len(fits) != 1:
            raise ValueError(
                f"weight_packed {packed.shape} for weight_shape {[rows, cols]} does not tell "
                "4-bit from 8-bit and no config says"
            )
        bits = fits[0]
    elif bits not in fits:
        raise ValueError(
            f"weight_packed has shape {packed.shape}; {bits}-bit weights of shape "
            f"{[rows, cols]} need ({rows}, {-(-cols * bits // 32)})"
        )
    if scale.ndim != 2 or scale.shape[0] != rows or scale.shape[1] < 1:
        raise ValueError(f"weight_scale must be ({rows}, n_groups), got {scale.shape}")
    ng = scale.shape[1]
    if ng > 1 and cols % ng:
        raise ValueError(f"weight_scale has {ng} groups, which do not divide {cols} columns")
    group = cols // ng
    bs = group if block_size is None else int(block_size)
    if not (bs == group or (ng == 1 and bs >= cols)):
        raise ValueError(f"block size {bs} does not match {ng} groups of {cols} columns")
    symmetric = zp_packed is None
    fmt = format_of(bits, symmetric)
    u = unpack_int32(packed, bits, cols)
    offset = 1 << (bits - 1)
    zp = None
    if symmetric:
        codes = (u.astype(np.int16) - offset).astype(np.int8)
        fill = np.zeros((rows, ng), np.int8)
    else:
        want = (-(-rows * bits // 32), ng)
        if zp_packed.dtype != np.int32 or zp_packed.shape != want:
            raise ValueError(
                f"weight_zero_point must be int32 {want}, got {zp_packed.dtype} {zp_packed.shape}"
            )
        zp = np.ascontiguousarray(unpack_int32(zp_packed.T, bits, rows).T)
        codes, fill = u, zp
    if ng * bs > cols:  # a padded block: its padding holds the code of 0
        pad = np.broadcast_to(fill[:, -1:], (rows, ng * bs - cols)).astype(codes.dtype)
        codes = np.concatenate([codes, pad], axis=1)
    data = pack_nibbles(codes) if bits == 4 else codes.view(np.uint8)
    return QuantizedTensor(
        data=np.ascontiguousarray(data),
        scales=np.ascontiguousarray(scale),
        zero_points=zp,
        format=fmt,
        block_size=bs,
        axis=1,
        shape=(rows, cols),
        dtype=np.dtype(scale.dtype if dtype is None else dtype),
    )


def quantization_config(format: str, group_size: int | None, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for one scheme applied to every Linear but `ignore`.

    Field for field what compressed-tensors 0.20.0's QuantizationConfig.model_dump() gives for
    such a config (its serializer leaves out unset optional weight fields).
    """
    bits, symmetric = scheme(format)
    weights = {
        "dynamic": False,
        "group_size": group_size,
        "num_bits": bits,
        "strategy": "channel" if group_size is None else "group",
        "symmetric": symmetric,
        "type": "int",
    }
    return {
        "config_groups": {
            "group_0": {
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "version": CT_VERSION,
    }


def config_scheme(config: dict) -> tuple[int, int | None]:
    """(num_bits, group_size or None) of a pack-quantized config with one int weight scheme."""
    if config.get("format") != "pack-quantized":
        raise ValueError(f"quantization_config format {config.get('format')!r} is not read here")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("only quantization_configs with exactly one config group are read")
    (group,) = groups.values()
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict) or w.get("type", "int") != "int":
        raise ValueError("the config group has no integer weight scheme")
    bits = w.get("num_bits")
    if bits not in (4, 8):
        raise ValueError(f"num_bits {bits!r} is not read here (4 and 8 are)")
    gs = w.get("group_size")
    return bits, gs if isinstance(gs, int) and gs > 0 else None
