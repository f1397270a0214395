"""The `quantize` command, through its entry point and as a real process."""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile

import pytest

from quantize import cli
from quantize.commands import demo


def test_demo_prints_a_table_for_every_format_and_block(capsys):
    argv = ["demo", "--formats", "int4", "uint4", "--block-size", "32", "64", "--no-model"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("int4", "uint4"))]
    assert [(ln[0], ln[1], ln[2]) for ln in lines] == [
        ("int4", "32", "rtn"),
        ("int4", "64", "rtn"),
        ("uint4", "32", "rtn"),
        ("uint4", "64", "rtn"),
    ]
    for ln in lines:
        assert 4.0 < float(ln[3]) < 6.0  # bits per weight, scales included
        assert 5.0 < float(ln[5]) < 40.0  # SQNR dB: real error, not zero, not garbage


def test_demo_rows_get_better_with_smaller_blocks_and_more_bits():
    rows = demo.run_demo(
        [("int4", 32), ("int4", 128), ("int8", 32), ("int8", 128)], out=io.StringIO()
    )
    by = {(r["format"], r["block"]): r for r in rows}
    assert by[("int4", 32)]["sqnr"] > by[("int4", 128)]["sqnr"]
    assert by[("int8", 128)]["sqnr"] > by[("int4", 32)]["sqnr"] + 15
    assert by[("int4", 32)]["bits"] == pytest.approx(4 + 32 / 32)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--formats", "int9"],
        ["demo", "--block-size", "0"],
        ["demo", "--block-size", "x"],
        ["nosuch"],
        [],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_failure_is_one_line_and_exit_1(monkeypatch, capsys):
    def boom(*a, **k):
        raise ValueError("something specific went wrong")

    monkeypatch.setattr(demo, "run_demo", boom)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "quantize: error: something specific went wrong"
    with pytest.raises(ValueError):
        cli.main(["--debug", "demo"])


def test_console_script_runs_as_a_process():
    done = subprocess.run(
        [sys.executable, "-m", "quantize.cli", "demo", "--formats", "int4", "--block-size", "128"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "int4" in done.stdout and "SQNR" in done.stdout
    version = subprocess.run(
        [sys.executable, "-m", "quantize.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.stdout.startswith("quantize ")


def test_import_loads_no_compiler():
    # import time itself is measured by benchmarks/bench_import.py, not asserted here
    code = "import sys, quantize, quantize.quant_utils, quantize.cli; print('numba' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


def test_demo_model_runs_in_onnxruntime_and_keeps_files_only_with_o(tmp_path, capsys, monkeypatch):
    rows = demo.run_model_demo(tmp_path, out=io.StringIO())
    assert [r["model"] for r in rows] == [demo.model_name(c) for c in demo.MODEL_CONFIGS]
    for r in rows:
        assert 5 < r["ratio"] < 8  # 4-bit codes plus scales, against float32
        assert 0.9 < r["cosine"] < 1.0  # really quantized, and still the same model
    assert (tmp_path / "demo_block.onnx").exists()
    by = {r["model"]: r for r in rows}
    assert by["demo_block.int4.b32.onnx"]["cosine"] > by["demo_block.int4.b128.onnx"]["cosine"]
    # the scale search pays on these heavy-tailed weights, at the same size
    assert by["demo_block.int4.b128.mse.onnx"]["cosine"] > by["demo_block.int4.b128.onnx"]["cosine"]
    assert by["demo_block.int4.b128.mse.onnx"]["MiB"] == by["demo_block.int4.b128.onnx"]["MiB"]

    scratch, cwd = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    assert cli.main(["demo", "--formats", "int4", "--block-size", "32"]) == 0
    assert not list(scratch.iterdir()) and not list(cwd.iterdir())  # nothing kept without -o
    assert "output cosine" in capsys.readouterr().out
    kept = tmp_path / "kept"
    assert cli.main(["demo", "--formats", "int4", "--block-size", "32", "-o", str(kept)]) == 0
    assert len(list(kept.glob("*.onnx"))) == 1 + len(demo.MODEL_CONFIGS)
