"""The Ray engine of the reference pass against the single-process pass, on the same prompts, in one run: the
embedded default (stories260K + its SAE + all-MiniLM-L6-v2), 1,024 P3 prompts cut at 128 tokens, chunks of 256,
a local Ray instance with 2 CPU workers of 1 thread each. Then what the overhead is made of: Ray's start, the
planning task, an actor's start-up, Ray Data's cost per chunk (a no-op actor over payloads of a chunk's size) and
the driver's own work per chunk (decode, verified write).
Run: `.venv/bin/python bench/bench_ray.py` (with SAEALIGN_ASSETS pointing at the asset mirror)."""

import os
import tempfile
from pathlib import Path

from benchlib import timed

import numpy as np
import torch

from safetensors.torch import load as load_bytes, save as save_bytes

from saealign.core import save_tensors
from saealign.distributed import Recipe, compute_reference_ray
from saealign.reference import build_reference_prompts, compute_reference

N_PROMPTS, CHUNK, MAX_TOKENS, WORKERS = 1024, 256, 128, 2
STORIES = Recipe("stories260K")


class Echo:
    "A Ray Data actor that does nothing but hand back a chunk-sized payload: what Ray Data costs per chunk."
    def __call__(self, batch):
        return {"chunk": batch["chunk"], "tensors": np.array([b"\0" * int(n) for n in batch["nbytes"]], dtype=object)}


def per_chunk_overhead(ray, n_rows: int, nbytes: int) -> float:
    "Seconds of a pipeline shaped like the pass (a block per chunk, 2 actors) whose actors do nothing."
    ds = ray.data.from_items([{"chunk": i, "nbytes": nbytes} for i in range(n_rows)], override_num_blocks=n_rows)
    ds.context.enable_progress_bars = False
    ds = ds.map_batches(Echo, batch_size=1, compute=ray.data.ActorPoolStrategy(size=WORKERS), num_cpus=1)
    return timed(lambda: sum(1 for _ in ds.iter_rows()))[1]


def main():
    import ray

    prompts = build_reference_prompts(N_PROMPTS, seed=0)
    (model, sae, embedder), t_load = timed(STORIES.load)
    threads = torch.get_num_threads()
    run = dict(chunk_size=CHUNK, max_tokens=MAX_TOKENS, embedding_cache=False, progress=False)
    torch.set_num_threads(1)
    single, t_single1 = timed(lambda: compute_reference(model, sae, prompts, embedder, **run))
    torch.set_num_threads(2)
    _, t_single2 = timed(lambda: compute_reference(model, sae, prompts, embedder, **run))
    torch.set_num_threads(threads)
    n_tok = int(single.token_counts.sum())

    _, t_init = timed(lambda: ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR"))
    tmp = Path(tempfile.mkdtemp())
    ref, t_ray = timed(lambda: compute_reference_ray(STORIES, prompts, workers=WORKERS, cache_dir=tmp / "ref", **run))
    assert ref.fingerprint == single.fingerprint and torch.equal(ref.summaries.to_dense(), single.summaries.to_dense())
    assert torch.equal(ref.embeddings, single.embeddings), "the Ray pass must equal the single-process pass"
    _, t_reuse = timed(lambda: compute_reference_ray(STORIES, prompts, workers=WORKERS, cache_dir=tmp / "ref", **run))
    # one actor, one 1-prompt chunk: Ray Data's start plus an actor's start-up (worker, imports, recipe) and the plan
    _, t_first = timed(lambda: compute_reference_ray(STORIES, prompts[:1], workers=1, **run))
    files = sorted((tmp / "ref").glob("chunk_*.safetensors"))
    nbytes = int(np.mean([p.stat().st_size for p in files]))
    chunk = load_bytes(files[0].read_bytes())
    blob = save_bytes(chunk)
    # what the driver does per arriving chunk: decode the bytes, write the verified file (checksums, fsync)
    t_driver = min(timed(lambda: save_tensors(tmp / "driver.safetensors", load_bytes(blob), {"chunk": 0}))[1]
                   for _ in range(5))
    t_noop_2, t_noop_34 = per_chunk_overhead(ray, 2, nbytes), per_chunk_overhead(ray, 34, nbytes)
    ray.shutdown()
    per_chunk = (t_noop_34 - t_noop_2) / 32

    print(f"\n== reference pass on Ray vs one process: stories260K + SAE {sae.cfg.d_sae} at "
          f"{sae.cfg.metadata.hook_name} "
          f"+ all-MiniLM-L6-v2; {N_PROMPTS} P3 prompts cut at {MAX_TOKENS} ({n_tok} tokens), chunks of {CHUNK}, "
          f"{os.cpu_count()} cores (shared with whatever else runs)")
    rows = [("one process, 1 torch thread", t_single1), ("one process, 2 torch threads", t_single2),
            (f"Ray, {WORKERS} workers x 1 thread (cold: plan + actors + pass)", t_ray)]
    for name, t in rows:
        print(f"   {name:58s} {t:7.1f} s  {N_PROMPTS / t:6.1f} prompts/s  {n_tok / t:7.0f} tok/s  "
              f"{t_single1 / t:5.2f}x one process, 1 thread")
    print("   identical: same fingerprint, summaries and embeddings as the single process (asserted)")
    print(f"   overhead: ray.init {t_init:.1f} s (once per session); recipe load in this process {t_load:.1f} s;")
    print(f"     the pass with every chunk cached (plan task + verify + merge) {t_reuse:.1f} s;")
    print(f"     a 1-prompt pass on one fresh actor (plan + Ray Data + actor start-up + recipe) {t_first:.1f} s;")
    print(f"     Ray Data per chunk (no-op actors, {nbytes / 2**20:.2f} MiB payload) {per_chunk * 1e3:.0f} ms, "
          f"= {per_chunk / (t_single1 / (N_PROMPTS / CHUNK)):.1%} of one {CHUNK}-prompt chunk's compute here "
          f"({t_single1 / (N_PROMPTS / CHUNK):.1f} s); the driver's decode + verified write of a chunk "
          f"{t_driver * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
