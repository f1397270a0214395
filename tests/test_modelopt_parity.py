"""Parity with NVIDIA ModelOpt 0.47.0's ONNX quant_utils, on vectors recorded from ModelOpt itself.

tests/reference/modelopt_0_47.npz is written by scripts/make_modelopt_vectors.py (see
tests/reference/README.md). Every case in its manifest's "cases" section is an input on which
ModelOpt is right; `quantize.quant_utils.<function>` must return the same thing: same output
count, None where ModelOpt returns None, and for arrays the same shape, dtype and values.

All comparisons are exact, float outputs included. Every float ModelOpt computes here is a
fixed sequence of correctly rounded IEEE-754 operations (abs, max, multiply, divide, clip, rint)
that a faithful re-implementation reproduces bit for bit; the one transcendental, log2 in
compute_e8m0, feeds a ceil, and the vectors keep every amax well away from the powers of two
where float32 log2 could round the wrong way. So no tolerance is needed, and one would hide
op-order differences that go on to flip rint ties.

The "deviations" section (ModelOpt's outputs where quantize differs on purpose) is not tested
here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

NPZ = Path(__file__).parent / "reference" / "modelopt_0_47.npz"

FUNCTIONS = {
    "compute_e8m0",
    "dq_tensor",
    "find_scales",
    "get_amax",
    "get_weights_scaling_factor",
    "get_weights_scaling_factor_2",
    "pack_float32_to_4bit_cpp_based",
    "pack_float32_to_4bit_optimized",
    "pack_weights_to_int4",
    "quant_tensor",
    "quantize",
    "rtn",
}


def _load() -> tuple[dict, dict[str, np.ndarray]]:
    if not NPZ.exists():
        return {}, {}
    with np.load(NPZ, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    manifest = json.loads(arrays.pop("manifest").tobytes().decode("utf-8"))
    return manifest, arrays


MANIFEST, ARRAYS = _load()
CASES = MANIFEST.get("cases", [])


def _arguments(case: dict) -> dict:
    """Keyword arguments for the call: fresh copies of the input arrays, plus the scalars."""
    forms = case.get("input_forms", {})
    args = {}
    for name, key in case["inputs"].items():
        arr = ARRAYS[key].copy()
        form = forms.get(name)
        if form == "scalar":  # e.g. ModelOpt's np.float32 weights_scaling_factor_2
            args[name] = arr[()]
        elif form == "list":  # a plain Python sequence
            args[name] = arr.tolist()
        else:
            args[name] = arr
    for name, value in case["kwargs"].items():
        args[name] = tuple(value) if isinstance(value, list) else value  # JSON list = tuple
    return args


def _assert_same(actual, spec: dict | None, what: str) -> None:
    if spec is None:
        assert actual is None, f"{what}: expected None, got {type(actual).__name__}"
        return
    expected = ARRAYS[spec["key"]]
    assert isinstance(actual, (np.ndarray, np.generic)), (
        f"{what}: expected a NumPy array, got {type(actual).__name__}"
    )
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    np.testing.assert_array_equal(actual, expected, err_msg=what, strict=True)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_matches_modelopt(case: dict) -> None:
    quant_utils = importlib.import_module("quantize.quant_utils")
    function = getattr(quant_utils, case["function"])
    args = _arguments(case)
    result = function(**args)

    if case["returns"] == "tuple":
        assert isinstance(result, tuple), f"expected a tuple, got {type(result).__name__}"
        assert len(result) == len(case["outputs"])
        outputs = list(result)
    else:
        outputs = [result]
    for i, (actual, spec) in enumerate(zip(outputs, case["outputs"], strict=True)):
        _assert_same(actual, spec, f"{case['id']} output {i}")
    if case["returns"] == "scalar":
        assert np.ndim(result) == 0

    for name, key in case["inputs"].items():  # inputs must not be written into
        if not case.get("input_forms", {}).get(name):
            np.testing.assert_array_equal(args[name], ARRAYS[key], strict=True)


def _check_case(case: dict, section: str) -> None:
    where = f"{section}: {case.get('id')}"
    assert isinstance(case["id"], str) and case["id"], where
    assert case["function"] in FUNCTIONS, where
    assert isinstance(case["kwargs"], dict), where
    for name, value in case["kwargs"].items():
        ok = value is None or isinstance(value, (bool, int, float, str))
        ok = ok or (isinstance(value, list) and all(isinstance(v, int) for v in value))
        assert ok, f"{where}: kwarg {name}={value!r} is not a scalar or int tuple"
    assert isinstance(case["inputs"], dict) and case["inputs"], where
    for key in case["inputs"].values():
        assert key in ARRAYS, f"{where}: missing input array {key}"
    for name, form in case.get("input_forms", {}).items():
        assert name in case["inputs"] and form in ("scalar", "list"), where
    assert case["returns"] in ("array", "scalar", "tuple"), where
    outputs = case["outputs"]
    assert isinstance(outputs, list) and outputs, where
    assert len(outputs) == 1 or case["returns"] == "tuple", where
    for spec in outputs:
        if spec is None:
            continue
        arr = ARRAYS[spec["key"]]
        assert spec["dtype"] == arr.dtype.name, f"{where}: dtype in manifest != stored"
        assert tuple(spec["shape"]) == arr.shape, f"{where}: shape in manifest != stored"
    if section == "deviations":
        assert isinstance(case.get("reason"), str) and case["reason"], where


def test_reference_file_is_well_formed() -> None:
    assert NPZ.exists(), f"{NPZ} is missing: run scripts/make_modelopt_vectors.py"
    assert MANIFEST["modelopt_version"] == "0.47.0"
    cases, deviations = MANIFEST["cases"], MANIFEST["deviations"]
    assert len(cases) >= 40
    assert isinstance(deviations, list) and deviations
    ids = [case["id"] for case in cases + deviations]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    for case in cases:
        _check_case(case, "cases")
    for case in deviations:
        _check_case(case, "deviations")
    assert {case["function"] for case in cases} == FUNCTIONS
    for key, arr in ARRAYS.items():
        assert arr.dtype.kind in "biuf", f"{key}: {arr.dtype} is not a plain numeric array"
    used = {key for case in cases + deviations for key in case["inputs"].values()}
    used |= {spec["key"] for case in cases + deviations for spec in case["outputs"] if spec}
    assert used == set(ARRAYS), "every stored array belongs to a case, and vice versa"
