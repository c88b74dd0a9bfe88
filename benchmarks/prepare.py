"""How fast ``sslrun data prepare imagefolder`` turns a folder of photo-like JPEGs into a ``.beton``, and how much
memory it takes.

The folder is written once by :mod:`photos` (``--cache``, reused on later runs): ``--n`` images of 300-500 px on the
longer side in 5 aspect ratios. Then ``sslrun data prepare imagefolder --set max_side=256 --format jpg --workers W``
runs in a subprocess through the CLI's own ``main``, start-up included. Memory is measured there: after the
libraries are loaded (the baseline), a thread samples every 20 ms the summed USS (private pages) of the process
and its writer processes; "added" is the peak minus the baseline. USS rather than PSS because the libraries'
shared pages count in a process's PSS divided by however many processes on the machine map them (other jobs move
it by hundreds of MB); decoded images held anywhere would be private pages. The total PSS peak is given too.

Reported: wall time, img/s, img/s per core (img/s / W), img per CPU-second, memory, output bytes per image, and
the 1-minute load average before and after (other jobs on a shared machine slow the wall clock, not the CPU-second
figure).

Usage::

    python benchmarks/prepare.py --n 10000 --cache /tmp/photos10k --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import write_photo_folder  # the benchmarks' photo-like folders live beside this script

# Run in the subprocess: load the libraries, take the baseline, run the CLI while sampling memory and CPU time.
_DRIVER = r"""
import json, sys, threading, time, psutil
import cv2, PIL.JpegImagePlugin
from sslrun.cli import main
from sslrun.core.data import writer
from sslrun.core.data.ffcv_compat import import_ffcv
import_ffcv()
me = psutil.Process()
info = me.memory_full_info()
base, peak_uss, peak_pss, cpu, stop = info.uss, [info.uss], [info.pss], {}, threading.Event()
def sample():
    while not stop.is_set():
        uss = pss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                m = p.memory_full_info()
                uss, pss = uss + m.uss, pss + m.pss
                cpu[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        peak_uss[0], peak_pss[0] = max(peak_uss[0], uss), max(peak_pss[0], pss)
        time.sleep(0.02)
t = threading.Thread(target=sample, daemon=True); t.start()
c0 = sum(me.cpu_times()[:2])
sys.argv = ["sslrun", *sys.argv[2:]]
t0 = time.perf_counter()
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
wall = time.perf_counter() - t0
stop.set(); t.join()
cpu[me.pid] = sum(me.cpu_times()[:2])
print(json.dumps({"run_s": wall, "cpu_s": sum(cpu.values()) - c0, "libraries_uss_mb": base / 2**20,
                  "added_uss_mb": (peak_uss[0] - base) / 2**20, "peak_pss_mb": peak_pss[0] / 2**20}))
"""


def measure(root: Path, output: Path, workers: int, max_side: int) -> dict[str, Any]:
    """Run the CLI once in a subprocess; its wall time (start-up included), CPU seconds and memory."""
    args = ["data", "prepare", "imagefolder", "--root", str(root), "-o", str(output), "--set", f"max_side={max_side}",
            "--set", "labels=none", "--format", "jpg", "--workers", str(workers)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _DRIVER, "-", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"prepare failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="photo-like JPEGs to prepare")
    p.add_argument("--cache", type=Path, default=None, help="keep the generated folder here (reused if complete)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="writer processes")
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument(
        "--result",
        default=None,
        help="write the JSON result, with the command, date and machine, to this file (e.g. docs/results/X.json)",
    )
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sslrun-prepare-") as tmp:
        root = args.cache or Path(tmp) / "photos"
        if len(list(root.glob("class_*/*.jpg"))) != args.n:
            t0 = time.perf_counter()
            write_photo_folder(root, args.n, workers=args.workers)
            print(f"wrote {args.n} photo-like JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        jpeg_mb = sum(f.stat().st_size for f in root.glob("class_*/*.jpg")) / 2**20
        load_before = os.getloadavg()[0]
        output = Path(tmp) / "out.beton"
        m = measure(root, output, args.workers, args.max_side)
        load_after = os.getloadavg()[0]
        from sslrun.core.data.format import verify_beton

        manifest = verify_beton(output)
        result = {
            "images": args.n,
            "workers": args.workers,
            "cores": len(os.sched_getaffinity(0)),
            "max_side": args.max_side,
            "wall_s": round(m["wall_s"], 1),
            "prepare_s": round(m["run_s"], 1),
            "img_s": round(args.n / m["wall_s"]),
            "img_s_per_core": round(args.n / m["wall_s"] / args.workers),
            "img_s_without_start_up": round(args.n / m["run_s"]),
            "img_per_cpu_s": round(args.n / max(m["cpu_s"], 1e-9)),
            "added_memory_mb": round(m["added_uss_mb"]),
            "libraries_mb": round(m["libraries_uss_mb"]),
            "peak_pss_mb": round(m["peak_pss_mb"]),
            "source_jpeg_kb_per_image": round(jpeg_mb * 1024 / args.n, 1),
            "beton_kb_per_image": round(manifest.bytes / 1024 / args.n, 1),
            "stored_sizes": [manifest.image_size_min, manifest.image_size],
            "load_avg_before_after": [round(load_before, 2), round(load_after, 2)],
            "start_up_included": True,
        }
    print(
        f"{args.n} images, {args.workers} writers: {result['wall_s']} s, {result['img_s']} img/s "
        f"({result['img_s_per_core']} per core, {result['img_per_cpu_s']} per CPU-s), memory added to the "
        f"libraries {result['added_memory_mb']} MB (libraries {result['libraries_mb']} MB); "
        f"load {result['load_avg_before_after']}"
    )
    if args.json:
        print(json.dumps(result))
    if args.result:
        from _common import write_result  # the benchmarks' helpers live beside this script

        write_result(args.result, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
