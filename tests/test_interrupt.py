"""SIGINT and SIGTERM stop a real `quantize safetensors` process cleanly: exit 130 / 143, one
line on stderr, and the output either complete (byte for byte the uninterrupted one) or
absent, with no temporary file left beside it.

Processes are stopped at known points through the test hook QUANTIZE_TEST_PAUSE_AFTER=N
(quantize.io.safetensors.PAUSE_ENV: the process says so on stderr and sleeps after N tensors;
N = all tensors is just before the rename), and at timed moments without the hook.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quantize.io._stfile import SafetensorsWriter
from quantize.io.safetensors import PAUSE_ENV

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SHARDS, PER_SHARD = 3, 3
TOTAL = SHARDS * PER_SHARD
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A sharded checkpoint (index, config) of 9 float16 tensors, big enough for the kernels."""
    d = tmp_path_factory.mktemp("in") / "ckpt"
    d.mkdir()
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(SHARDS):
        fname = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        with SafetensorsWriter(d / fname, {"format": "pt"}) as w:
            for i in range(PER_SHARD):
                name = f"model.layers.{s}.mlp.proj{i}.weight"
                w.add(name, rng.standard_normal((512, 1024)).astype(np.float16))
                weight_map[name] = fname
    index = {"metadata": {}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text("{}")
    return d


def _cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "quantize.cli",
        "safetensors",
        str(src),
        "-o",
        str(out),
        "--quiet",
        "--no-report",
        *extra,
    ]


def _tree(folder: Path) -> dict[str, bytes]:
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The uninterrupted outputs: the folder, and the first shard converted alone."""
    d = tmp_path_factory.mktemp("ref")
    subprocess.run(_cmd(ckpt, d / "out"), check=True, capture_output=True)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    subprocess.run(_cmd(shard, d / "one.safetensors"), check=True, capture_output=True)
    return {"folder": _tree(d / "out"), "file": _tree(d / "one.safetensors")}


def _leftovers(folder: Path, allowed: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in allowed)


def _wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """Read proc's stderr until a line holds `marker` (the hook's), failing after `timeout`."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=1):
            continue
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return line
    proc.kill()
    raise AssertionError(f"no {marker!r} from the process; stderr: {''.join(seen)}")


def _run_paused(cmd, pause_after: int, sig: int, jobs: int = 1):
    env = {**os.environ, PAUSE_ENV: str(pause_after), "QUANTIZE_TEST_PAUSE_SECONDS": "60"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _wait_for_line(proc, "quantize-test: paused")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize(
    ("pause_after", "sig", "jobs"),
    [
        (0, signal.SIGINT, 1),  # before the first tensor
        (4, signal.SIGTERM, 1),  # inside the second shard
        (TOTAL, signal.SIGINT, 1),  # all written, index too: just before the rename
        (TOTAL, signal.SIGTERM, 1),
        (1, signal.SIGTERM, 2),  # workers busy: the parent must stop them
        (2, signal.SIGINT, 2),
    ],
)
def test_folder_interrupted_at_known_points_leaves_nothing(ckpt, tmp_path, pause_after, sig, jobs):
    out = tmp_path / "out"
    rc, err = _run_paused(_cmd(ckpt, out, "--jobs", str(jobs)), pause_after, sig, jobs)
    assert rc == EXIT[sig], err
    assert not out.exists()
    assert _leftovers(tmp_path, set()) == []
    last = err.strip().splitlines()[-1]
    assert last.startswith("quantize: ") and "nothing was written" in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_single_file_interrupted_leaves_nothing(ckpt, tmp_path, sig):
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    out = tmp_path / "one.safetensors"
    rc, err = _run_paused(_cmd(shard, out), 2, sig)
    assert rc == EXIT[sig], err
    assert _leftovers(tmp_path, set()) == []  # no output, no scratch (.part) file


def test_interrupted_replacement_keeps_the_old_output(ckpt, tmp_path, reference):
    """--force over an existing output, stopped just before the rename: the old one stays."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    rc, err = _run_paused(_cmd(ckpt, out, "--force"), TOTAL, signal.SIGTERM)
    assert rc == 143, err
    assert _tree(out) == {"old.txt": b"the previous output"}
    assert _leftovers(tmp_path, {"out"}) == []


@pytest.mark.parametrize("delay", [0.3, 1.5, 3.0])
def test_killed_at_any_moment_output_is_complete_or_absent(ckpt, tmp_path, reference, delay):
    """No hook: a signal at a timed moment (start-up, mid-run, or after the end)."""
    out = tmp_path / "out"
    sig = signal.SIGTERM if int(delay * 10) % 2 else signal.SIGINT
    proc = subprocess.Popen(
        _cmd(ckpt, out, "--jobs", "2" if delay > 2 else "1"),
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    # before the CLI installs its handlers (interpreter start-up) the signal's default action
    # kills the process: -signal, the same 128+signal a shell reports; nothing was started then
    assert proc.returncode in (0, EXIT[sig], -sig), err
    if proc.returncode == 0:
        assert _tree(out) == reference["folder"]
    else:
        assert not out.exists(), err
    assert _leftovers(tmp_path, {"out"}) == []
