"""What the benchmarks share: the hub kept offline, their command-line options, and best-of timing with the
configurations taken in turn each round, so background load on a busy machine hits every one alike."""
import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any benchmark imports huggingface_hub


def timed(fn):
    "`(fn(), seconds it took)`."
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_of(fn, n: int = 3) -> float:
    "The fastest of `n` runs of `fn`, in seconds."
    return min(timed(fn)[1] for _ in range(n))


def interleaved_best_of(fns: dict, n: int = 3) -> dict:
    "Best of `n` seconds per function, timing every function once per round."
    best = {k: float("inf") for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            best[k] = min(best[k], timed(fn)[1])
    return best


def options(*, tokens: int | None = None, repeats: int = 3) -> argparse.Namespace:
    "`--repeats` (rounds, the best kept) and, when `tokens` is given, `--tokens` (new tokens per generation)."
    parser = argparse.ArgumentParser()
    if tokens is not None:
        parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()


def torch_inference() -> None:
    "Autograd off, and torch's version and thread count printed: the first line of every timing."
    import torch
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
