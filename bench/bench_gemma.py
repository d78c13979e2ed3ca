"""Gemma 3 270M: load times and per-token generation cost, side by side in one run.

Configurations per round: HF's own `generate`, transformer_lens as it ships, transformer_lens after
`fast_weights`, and saealign's steered generation (Swap through an SAE at blocks.6.hook_resid_post).
Rounds are interleaved and the best of `--repeats` is kept, so background load hits every one alike.
Target (issue 10): steered generation per token <= 1.3x HF's plain `generate`.

Run: `.venv/bin/python bench/bench_gemma.py` (part of `make bench`).
"""
from benchlib import interleaved_best_of, options, timed, torch_inference

import torch
from sae_lens import HookedSAETransformer
from transformers import AutoModelForCausalLM, AutoTokenizer

from saealign.models import GEMMA_HUB_ID, gemma_folder, load_model
from saealign.saes import load_sae
from saealign.steering import Swap, generate

PROMPT = "The patient was diagnosed with"


def main():
    args = options(tokens=32)
    torch_inference()
    folder = gemma_folder()
    model, load_s = timed(lambda: load_model("gemma-3-270m"))
    hf, hf_s = timed(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    print(f"warm load_model: {load_s:.1f} s (HF from the cached folder alone: {hf_s:.1f} s)")
    stock = HookedSAETransformer.from_pretrained_no_processing(
        GEMMA_HUB_ID, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(folder), dtype=torch.float32).eval()
    sae = load_sae(model=model)  # the default SAE: TopK 4,096 latents at blocks.6.hook_resid_post
    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    ids = model.to_tokens(PROMPT)
    n = args.tokens
    configs = {
        "HF generate": lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False),
        "TL as shipped": lambda: stock.generate(ids, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False),
        "TL fast_weights": lambda: generate(model, None, PROMPT, max_new_tokens=n, do_sample=False),
        "Swap (SAE at layer 6)": lambda: generate(model, sae, PROMPT, Swap(scores), max_new_tokens=n, do_sample=False),
    }
    for fn in configs.values():  # warm-up
        fn()
    best = {name: seconds / n for name, seconds in interleaved_best_of(configs, args.repeats).items()}
    print(f"\nGemma 3 270M, {n} new tokens, greedy, batch 1, best of {args.repeats}")
    print(f"{'config':<22} {'s/token':>8} {'÷ HF':>6}")
    for name, t in best.items():
        print(f"{name:<22} {t:8.3f} {t / best['HF generate']:6.2f}")
    swap = best["Swap (SAE at layer 6)"] / best["HF generate"]
    print(f"steered ÷ HF generate = {swap:.2f} (target ≤ 1.3): {'met' if swap <= 1.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
