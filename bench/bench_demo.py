"""The main job's wall time: `saealign demo` in a fresh process with a warm cache, against the 2-minute target.

Run: `make bench` (or `.venv/bin/python bench/bench_demo.py`). The first run warms the cache (reference set,
sampled stories); the next `--repeats` runs are timed and the best is kept.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import options, timed

TARGET_S = 120.0  # issue 5: under two minutes on this CPU with a warm cache


def run_demo(workdir: str) -> float:
    return timed(lambda: subprocess.run([str(Path(sys.executable).with_name("saealign")), "demo"], cwd=workdir,
                                        check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True))[1]


if __name__ == "__main__":
    args = options()
    with tempfile.TemporaryDirectory() as workdir:
        cold = run_demo(workdir)
        warm = min(run_demo(workdir) for _ in range(args.repeats))
        size = (Path(workdir) / "saealign-report.html").stat().st_size
    print(f"saealign demo: first run {cold:.1f} s, warm {warm:.1f} s (best of {args.repeats}); "
          f"target {TARGET_S:.0f} s; warm / target = {warm / TARGET_S:.3f}; report {size / 1024:.0f} KiB")
