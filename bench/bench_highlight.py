"""What highlighting costs per continuation: steered generation, the one teacher-forced pass the token details always
ran (`render.token_details`), one `highlighting.token_pass`, and `highlight` (its two passes: the details' and the one
extra that attribution needs), best of `--repeats`, rounds interleaved.

Target (issue 25): attribution adds at most one teacher-forced pass per continuation, i.e. highlight ≈ 2 passes and
highlight − token_details ≈ 1 pass.

Run: `.venv/bin/python bench/bench_highlight.py` (part of `make bench`).
"""
from benchlib import interleaved_best_of, options, torch_inference

import torch

from saealign.highlighting import highlight, token_pass
from saealign.models import load_model
from saealign.render import token_details
from saealign.saes import load_sae
from saealign.methods import Swap
from saealign.steering import generate


def bench(title, model, prompt, n_tokens, repeats):
    sae = load_sae(model=model)
    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    method = Swap(scores)
    g = generate(model, sae, prompt, method, max_new_tokens=n_tokens, seed=0)[0]
    runs = {"generate": lambda: generate(model, sae, prompt, method, max_new_tokens=n_tokens, seed=0),
            "token_details": lambda: token_details(model, sae, g, scores, method),
            "token_pass": lambda: token_pass(model, sae, g, method),
            "highlight": lambda: highlight(model, sae, g, scores, method)}
    t = interleaved_best_of(runs, repeats)
    print(f"\n{title}  ({len(g.tokens)} tokens, Swap, best of {repeats})")
    for name, s in t.items():
        print(f"{name:<14} {s:7.3f} s  {s / t['token_pass']:5.2f} passes  {s / t['generate']:5.2f}x generate")
    extra = t["highlight"] - t["token_details"]
    print(f"highlight − token_details: {extra:.3f} s = {extra / t['token_pass']:.2f} teacher-forced passes "
          f"({extra / t['generate']:.2f}x the generation)")
    return t


def main():
    args = options(tokens=64)
    torch_inference()
    bench("stories260K + embedded SAE", load_model("stories260K"), "Once upon a time", args.tokens, args.repeats)
    bench("Gemma 3 270M + TopK 4,096 @ blocks.6.hook_resid_post", load_model("gemma-3-270m"),
          "The patient was diagnosed with", args.tokens, args.repeats)


if __name__ == "__main__":
    main()
