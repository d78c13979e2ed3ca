"""Per-token generation cost with the KV cache: no SAE, spliced SAE, Swap, Clamp — measured side by side.

Run: `make bench` (or `.venv/bin/python bench/bench_steering.py`). Configurations are interleaved within
each repetition and the best of `--repeats` is kept, so background load hits every configuration alike.
"""
from benchlib import interleaved_best_of, options, torch_inference

import torch

from saealign.models import load_model
from saealign.saes import load_sae, random_sae
from saealign.methods import Clamp, Swap
from saealign.steering import generate

PAPER_S_PER_64_TOKENS = 6.263  # Swap, paper Table 3 (V100, no KV cache: the whole sequence re-run per token)
PAPER_SWAP_OVERHEAD_S = 0.00092  # Swap minus unmodified, per token (paper abstract)


def bench(title, model, sae, prompt, n_tokens, repeats):
    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    configs = {"no SAE": (None, None), "spliced SAE": (sae, None), "Swap": (sae, Swap(scores)),
               "Clamp": (sae, Clamp(scores))}
    runs = {name: lambda s=s, m=m: generate(model, s, prompt, m, max_new_tokens=n_tokens, do_sample=False, seed=0)
            for name, (s, m) in configs.items()}
    generate(model, sae, prompt, Swap(scores), max_new_tokens=4)  # warm-up
    times = {name: seconds / n_tokens for name, seconds in interleaved_best_of(runs, repeats).items()}
    print(f"\n{title}  ({n_tokens} new tokens, greedy, batch 1, best of {repeats})")
    print(f"{'config':<12} {'ms/token':>9} {'s/64 tok':>9} {'÷ spliced':>10} {'÷ no SAE':>9}")
    for name, t in times.items():
        print(f"{name:<12} {t * 1e3:9.2f} {t * 64:9.3f} {t / times['spliced SAE']:10.3f} {t / times['no SAE']:9.3f}")
    swap = times["Swap"]
    print(f"Swap − no SAE: {(swap - times['no SAE']) * 1e3:.2f} ms/token (paper: {PAPER_SWAP_OVERHEAD_S * 1e3:.2f} ms); "
          f"64 tokens: {swap * 64:.2f} s vs the paper's {PAPER_S_PER_64_TOKENS} s "
          f"({swap * 64 / PAPER_S_PER_64_TOKENS:.2f}× the paper's time; different hardware, KV cache here)")
    return times


def main():
    args = options(tokens=32)
    torch_inference()
    stories = load_model("stories260K")
    bench("stories260K + embedded SAE", stories, load_sae(model=stories), "Once upon a time", args.tokens, args.repeats)
    gpt2 = load_model("gpt2-small-random")
    prompt = "The patient was admitted to the hospital with a high fever and"
    bench("gpt2-small-random + ReLU 24,576 latents @ blocks.6.hook_resid_pre", gpt2,
          random_sae("standard", 768, 24576, "blocks.6.hook_resid_pre", bias=-0.05), prompt, args.tokens, args.repeats)
    bench("gpt2-small-random + TopK-32 32,768 latents @ blocks.6.hook_resid_post", gpt2,
          random_sae("topk", 768, 32768, "blocks.6.hook_resid_post", k=32), prompt, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
