"""`quantize safetensors` on a big sharded checkpoint: peak memory and wall time.

Run by hand (it writes SIZE GB of shards, then SIZE/4 GB per output, and deletes them all):

    python benchmarks/big_checkpoint.py                       # 20 GB, 5 GB shards, --jobs 1 and 2
    python benchmarks/big_checkpoint.py --size-gb 4 --jobs 1,2 --format nf4

The checkpoint is llama-like: bfloat16 (or --dtype f16) 4096x11008 and 4096x4096 weights plus
a norm per layer, in SHARD GB shards with an index, generated fast (one random tensor, each
copy with its low mantissa bits changed, so no two tensors are equal). For each --jobs value the
command runs as a child process; a sampler reads /proc every 50 ms and sums the resident size
(VmRSS) of that process and all its descendants (workers): the peak of that sum is "tree peak".
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` gives the largest single process's peak.

Reading the input once is timed with `cat shards > /dev/null`, before and after the runs; the
page cache cannot be dropped here (no root over the host), so `fincore` says how much of the
input was cached, and the ratio job time / cat time is printed for both. Results go to stdout;
benchmarks/big_checkpoint.md holds the figures measured on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from quantize.io._stfile import SafetensorsWriter

GB = 1e9
SHAPES = [("self_attn.q_proj", (4096, 4096)), ("self_attn.k_proj", (4096, 4096)),
          ("self_attn.v_proj", (4096, 4096)), ("self_attn.o_proj", (4096, 4096)),
          ("mlp.gate_proj", (11008, 4096)), ("mlp.up_proj", (11008, 4096)),
          ("mlp.down_proj", (4096, 11008))]  # fmt: skip


def generate(folder: Path, size: float, shard: float, dtype: np.dtype) -> tuple[int, int]:
    """Write the checkpoint; returns (total bytes, largest tensor's bytes)."""
    rng = np.random.default_rng(0)
    base = {
        shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype).view(np.uint16)
        for shape in {s for _, s in SHAPES}
    }
    weight_map: dict[str, str] = {}
    total, files, layer = 0, [], 0
    writer, in_shard = None, 0
    while total < size:
        if writer is None:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            files.append(fname)
            writer = SafetensorsWriter(folder / fname, {"format": "pt"})
            in_shard = 0
        for part, shape in SHAPES:
            name = f"model.layers.{layer}.{part}.weight"
            data = base[shape] ^ np.uint16((layer * 7 + len(part)) & 0x7F)  # low mantissa bits
            writer.add(name, data.view(dtype))
            weight_map[name] = files[-1]
            in_shard += data.nbytes
            total += data.nbytes
        name = f"model.layers.{layer}.input_layernorm.weight"
        writer.add(name, np.ones(4096, dtype))
        weight_map[name] = files[-1]
        layer += 1
        if in_shard >= shard or total >= size:
            writer.__exit__(None, None, None)
            writer = None
    n = len(files)
    renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        (folder / old).rename(folder / new)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: renamed[v] for k, v in weight_map.items()},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    largest = max(int(np.prod(s)) for _, s in SHAPES) * np.dtype(dtype).itemsize
    return total, largest


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 for those already gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def run_quantize(src: Path, out: Path, jobs: int, fmt: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "quantize.cli",
        "safetensors",
        str(src),
        "-o",
        str(out),
        "--format",
        fmt,
        "--jobs",
        str(jobs),
        "--quiet",
        "--no-report",
    ]
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"quantize failed ({rc}): {' '.join(cmd)}")
    out_bytes = sum(p.stat().st_size for p in out.iterdir())
    return {"seconds": seconds, "tree_peak": peak[0], "out_bytes": out_bytes}


def cat_time(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(f"cat {' '.join(map(str, files))} > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (util-linux fincore), None if unknown."""
    if shutil.which("fincore") is None:
        return None
    res = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES,SIZE", *map(str, files)], capture_output=True, text=True
    )
    if res.returncode != 0:
        return None
    res_b = size_b = 0
    for line in res.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res_b, size_b = res_b + int(r), size_b + int(s)
    return res_b / size_b if size_b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=20.0)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    ap.add_argument("--jobs", default="1,2", help="comma-separated --jobs values to run")
    ap.add_argument("--format", default="int4")
    ap.add_argument("--dir", default=None, help="where to put the temporary folder")
    args = ap.parse_args()
    dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bf16" else np.dtype(np.float16)

    work = Path(tempfile.mkdtemp(prefix="quantize-big-", dir=args.dir))
    try:
        src = work / "ckpt"
        src.mkdir()
        t0 = time.perf_counter()
        total, largest = generate(src, args.size_gb * GB, args.shard_gb * GB, dtype)
        shards = sorted(src.glob("*.safetensors"))
        print(
            f"checkpoint: {total / GB:.2f} GB in {len(shards)} shards, {args.dtype}, largest "
            f"tensor {largest / 2**20:.0f} MiB; generated in {time.perf_counter() - t0:.0f} s"
        )
        print(
            f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
            "(other processes share the CPUs)"
        )
        cached = cached_fraction(shards)
        t_cat = cat_time(shards)
        print(
            f"cat > /dev/null: {t_cat:.1f} s ({total / GB / t_cat:.2f} GB/s), "
            f"input in page cache before: {cached if cached is None else f'{cached:.0%}'}"
        )
        limit = 2 * 2**30 + largest
        for jobs in (int(j) for j in args.jobs.split(",")):
            out = work / f"out-{jobs}"
            cached = cached_fraction(shards)
            r = run_quantize(src, out, jobs, args.format)
            ok = "under" if r["tree_peak"] < limit else "OVER"
            print(
                f"--jobs {jobs}: {r['seconds']:.1f} s ({total / GB / r['seconds']:.2f} GB/s in), "
                f"{r['seconds'] / t_cat:.1f}x the cat time; tree peak RSS "
                f"{r['tree_peak'] / 2**30:.2f} GiB ({ok} 2 GiB + largest tensor = "
                f"{limit / 2**30:.2f} GiB); output {r['out_bytes'] / GB:.2f} GB; input cached "
                f"before: {cached if cached is None else f'{cached:.0%}'}"
            )
            shutil.rmtree(out)
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(f"largest single child process peak RSS (getrusage): {maxrss / 2**30:.2f} GiB")
        t_cat2 = cat_time(shards)
        print(
            f"cat again after the runs: {t_cat2:.1f} s ({total / GB / t_cat2:.2f} GB/s), "
            f"input cached: {cached_fraction(shards)}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
