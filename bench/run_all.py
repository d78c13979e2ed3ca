"""Every benchmark, one after the other: `make bench`."""
import runpy
from pathlib import Path

for script in ("bench_reference.py", "bench_ray.py", "bench_steering.py", "bench_gemma.py", "bench_highlight.py",
               "bench_demo.py", "bench_calibration.py", "bench_export.py"):
    print(f"\n######## {script}")
    runpy.run_path(str(Path(__file__).parent / script), run_name="__main__")
