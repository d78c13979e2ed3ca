"""Gemma 3 270M: load times, per-token generation cost, the reference pass and the explorer, in one run.

Generation, configurations per round: HF's own `generate`, transformer_lens as it ships, transformer_lens
after `fast_weights`, and saealign's steered generation (Swap through an SAE at blocks.6.hook_resid_post).
Rounds are interleaved and the best of `--repeats` is kept, so background load hits every one alike.
The unembedding of a decoding step, transformer_lens's own `F.linear` (on the contiguous `W_U.T` that
`fast_weights` stores) against the product written as `W_U.T @ x.T`, for 1 to 8 rows.
Targets: steered generation per token <= 1.3x HF's plain `generate` (issue 10); the reference pass >= 0.9x
its floor (forward to the hook + encode) on real P3 prompts; the explorer re-scores a topic in < 2 s on the
8,192-prompt reference and renders a 48-token side-by-side in < 30 s (issue 11); the default method's per-topic
measurements (output scores, activation means) timed beside the paper's scoring (issue 12).

Run: `.venv/bin/python bench/bench_gemma.py` (part of `make bench`).
"""
from benchlib import best_of, interleaved_best_of, options, timed, torch_inference

import torch
from sae_lens import HookedSAETransformer
from transformers import AutoModelForCausalLM, AutoTokenizer

from saealign.embeddings import load_embedder
from saealign.grid import evaluation_topics
from saealign.models import GEMMA_HUB_ID, gemma_folder, load_model, model_spec
from saealign.activations import pad_right, tokenize
from saealign.reference import build_reference_prompts, compute_reference, default_reference, reference_plan
from saealign.saes import load_sae
from saealign.calibration import DEFAULT_METHOD
from saealign.additive import activation_means, reference_sample
from saealign.output_scores import output_scores
from saealign.methods import Swap
from saealign.steering import generate
from saealign.widgets import AlignmentExplorer

PROMPT = "The patient was diagnosed with"


def generation_bench(args):
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
    return model, sae


def reference_pass_bench(model, sae, n_prompts=256, batch=32, max_tokens=128):
    """compute_reference (no embeddings, no cache) against its floor on the same right-padded batches. Its one-off
    cost per call (checks and the fingerprint: hashing the 262,144-token vocabulary and a weight sample) is timed
    apart: it is ~1.5 s against the ~800 s of the 8,192-prompt pass."""
    prompts = build_reference_prompts(n_prompts, seed=0)
    ids, _ = tokenize(model, prompts, max_tokens)
    ids = sorted(ids, key=len, reverse=True)  # compute_reference sorts by length too: the same padding
    batches = [pad_right(ids[i:i + batch], model.tokenizer.pad_token_id, "cpu") for i in range(0, len(ids), batch)]
    layer = int(sae.cfg.metadata.hook_name.split(".")[1])

    def floor():  # the model up to the hook (resid_post of block `layer`) and the SAE's encoder, nothing else
        for tokens, mask in batches:
            sae.encode(model(tokens, stop_at_layer=layer + 1, attention_mask=mask))

    def ours():
        compute_reference(model, sae, prompts, None, batch_size=batch, max_tokens=max_tokens, progress=False)

    floor(), ours()  # warm-up
    t = interleaved_best_of({"floor": floor, "ours": ours})
    n_tok = sum(len(x) for x in ids)
    print(f"\nreference pass, {n_prompts} P3 prompts ({n_tok} tokens, ≤ {max_tokens} each), batch {batch}, "
          f"SAE at {sae.cfg.metadata.hook_name}")
    print(f"  floor (forward to the hook + encode) {t['floor']:6.2f} s  {n_tok / t['floor']:6.0f} tok/s")
    print(f"  compute_reference                    {t['ours']:6.2f} s  {n_tok / t['ours']:6.0f} tok/s")
    fixed = best_of(lambda: reference_plan(model, sae, None, "", 512, max_tokens))
    print(f"  of which the one-off checks and fingerprint: {fixed:.2f} s; without them speed ÷ floor = "
          f"{t['floor'] / (t['ours'] - fixed):.2f}")
    ratio = t["floor"] / t["ours"]
    print(f"  speed ÷ floor = {ratio:.2f} (target ≥ 0.9): {'met' if ratio >= 0.9 else 'NOT met'}")


def unembedding_bench(model, rows=(1, 2, 4, 8)):
    "Milliseconds per unembedding of a decoding step's rows: the model's own forward against `W_U.T @ x.T`."
    unembed = model.unembed
    print("\nunembedding (262,144 tokens) per decoding step: transformer_lens's F.linear / W_U.T @ x.T")
    for n in rows:
        x = torch.randn(n, 1, model.cfg.d_model)
        flat = x.reshape(n, -1)
        best = interleaved_best_of({"own": lambda: unembed(x),
                                    "columns": lambda: (unembed.W_U.T @ flat.T).T + unembed.b_U}, n=5)
        print(f"  {n} rows: {best['own'] * 1e3:.0f} ms / {best['columns'] * 1e3:.0f} ms = "
              f"{best['own'] / best['columns']:.2f}")


def explorer_bench(model, sae, tokens=48):
    """The explorer on the default 8,192-prompt reference: re-scoring a topic; what the default method measures
    for a topic beside it (output scores, uncached here, and activation means); side-by-side renders."""
    embedder = load_embedder()
    reference = default_reference(model, sae, embedder, n=8192)
    explorer = AlignmentExplorer(model, sae, reference, embedder, prompt=PROMPT)
    topics = evaluation_topics(model=model)
    explorer.score(topics["cooking-20"])  # warm-up: builds scoring's cached transpose once
    # topics the explorer has not scored yet (it remembers each list of texts, and scores its first at start)
    rescore = [timed(lambda t=t: explorer.score(topics[t]))[1] for t in ("law-20", "amazon-20", "sports-20")]
    texts = topics["medical-20"]
    neutral = list(model_spec(model).neutral_prompts)
    output_s = [timed(lambda t=t: output_scores(model, sae, explorer.score(topics[t]), topics[t], neutral,
                                                reference_texts=reference.prompts, cache_dir=False))[1]
                for t in ("law-20", "sports-20")]
    reference_means_s = timed(lambda: activation_means(model, sae, reference_sample(reference)))[1]
    topic_means_s = timed(lambda: activation_means(model, sae, texts))[1]
    explorer.inputs(texts).means  # measured once per explorer (the reference's) and per topic, then kept
    explorer.inputs(texts).output  # from the disk cache when measured before
    render = lambda method, s: timed(lambda: explorer.render_html(PROMPT, texts, method=method, max_new_tokens=tokens,
                                                                  seed=s))[1]
    side = {method: [render(method, s) for s in range(2)] for method in ("Swap", DEFAULT_METHOD)}
    print(f"\nexplorer, reference of {reference.n_prompts} prompts")
    print(f"  re-scoring a topic (20 texts, a new list each time): {min(rescore):.2f}–{max(rescore):.2f} s over 3 "
          "topics (target < 2 s)")
    print(f"  what {DEFAULT_METHOD} measures for a new topic, once: output scores of 100 latents "
          f"{min(output_s):.1f}–{max(output_s):.1f} s over 2 topics (uncached), activation means of its texts "
          f"{topic_means_s:.1f} s; the reference's means, once per SAE: {reference_means_s:.1f} s")
    for method, t in side.items():
        print(f"  {tokens}-token side-by-side (unsteered + {method}, rendered, the topic's inputs kept): {min(t):.1f} s best "
              f"of 2 seeds, {max(t):.1f} s worst (target < 30 s)")


def main():
    args = options(tokens=32)
    torch_inference()
    model, sae = generation_bench(args)
    with torch.inference_mode():
        unembedding_bench(model)
    reference_pass_bench(model, sae)
    explorer_bench(model, sae)


if __name__ == "__main__":
    main()
