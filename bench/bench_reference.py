"""Benchmarks at GPT-2-small shape (random weights, real tokenizer, a random 24,576-latent ReLU SAE at
blocks.6.hook_resid_pre): the reference pass against its floor, the naive per-prompt loop and a full forward;
then score_latents on a synthetic 8,192-prompt reference set. Run: `.venv/bin/python bench/bench_reference.py`
(with SAEALIGN_ASSETS pointing at the asset mirror)."""

import time

from benchlib import best_of, interleaved_best_of

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from saealign.core import load_texts
from saealign.embeddings import load_embedder
from saealign.models import load_model
from saealign.activations import pad_right, tokenize
from saealign.reference import ReferenceSet, _rows_to_csr, build_reference_prompts, compute_reference
from saealign.scoring import summaries_by_latent, score_latents

HOOK, D_SAE, N_PROMPTS, N_TOKENS, BATCH = "blocks.6.hook_resid_pre", 24576, 64, 128, 32
TARGET_L0 = 30  # active latents per token: sets the encoder bias


class PrecomputedEmbedder:
    "Serves embeddings computed beforehand, so score_latents can be timed without the embedding model."
    def __init__(self, emb, texts):
        self.emb, self.table = emb, dict(zip(texts, emb.encode(texts, convert_to_tensor=True, normalize_embeddings=True)))

    def get_embedding_dimension(self):
        return self.emb.get_embedding_dimension()

    def state_dict(self):
        return self.emb.state_dict()

    def encode(self, texts, **kw):
        return torch.stack([self.table[t] for t in texts])


def random_sae(model, prompts):
    "A StandardSAE (ReLU) with random weights and one shared encoder bias chosen so ~TARGET_L0 latents fire per token."
    cfg = StandardSAEConfig(d_in=768, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK, model_name="gpt2-small-random"))
    sae = StandardSAE(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(D_SAE, 768, generator=g), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        ids, _ = tokenize(model, prompts[:8], N_TOKENS)
        resid = model(pad_right(ids, 0, "cpu")[0], stop_at_layer=6)[:, 1:]  # calibration tokens, BOS left out
        pre = (sae.process_sae_in(resid) @ sae.W_enc).flatten()
        pre = pre[torch.randperm(pre.numel(), generator=g)[:2**24 - 1]]  # torch.quantile's input limit
        sae.b_enc.fill_(-pre.quantile(1 - TARGET_L0 / D_SAE).item())
    return sae


def reference_pass_bench():
    torch.manual_seed(0)
    model = load_model("gpt2-small-random")
    long_enough = [p for p in build_reference_prompts(400, seed=0) if len(model.to_tokens(p, truncate=False)[0]) >= N_TOKENS]
    prompts = long_enough[:N_PROMPTS]
    assert len(prompts) == N_PROMPTS
    sae = random_sae(model, prompts)
    ids, _ = tokenize(model, prompts, N_TOKENS)
    batches = [pad_right(ids[i:i + BATCH], model.tokenizer.pad_token_id, "cpu") for i in range(0, N_PROMPTS, BATCH)]
    n_tok = sum(len(x) for x in ids)

    def floor():  # (a) forward stopped at the hook (resid_pre of block 6 = output of block 5) + encode
        with torch.inference_mode():
            for tokens, _ in batches:
                sae.encode(model(tokens, stop_at_layer=6))

    ref_holder = {}

    def ours():  # (b) the whole reference pass, without embeddings
        ref_holder["ref"] = compute_reference(model, sae, prompts, None, batch_size=BATCH, max_tokens=N_TOKENS,
                                              progress=False)

    def naive():  # (c) the paper-code way: one full run_with_cache_with_saes per prompt, dense sums
        with torch.inference_mode():
            for x in ids:
                _, cache = model.run_with_cache_with_saes(x[None], saes=[sae])
                z = cache[f"{HOOK}.hook_sae_acts_post"][0, 1:].sum(0)
                _ = z / z.sum()

    def full():  # (d) a full forward, logits included
        with torch.inference_mode():
            for tokens, _ in batches:
                model(tokens)

    t = interleaved_best_of({"a": floor, "b": ours, "c": naive, "d": full})
    ref = ref_holder["ref"]
    with torch.inference_mode():  # density actually reached
        z = sae.encode(model(batches[0][0][:4], stop_at_layer=6))[:, 1:]
    l0 = (z > 0).sum(-1).float().mean().item()
    per_prompt = ref.summaries.crow_indices().diff().float().mean().item()

    print(f"\n== reference pass: gpt2-small-random, SAE 768 -> {D_SAE} ReLU at {HOOK}; {N_PROMPTS} prompts x "
          f"{N_TOKENS} tokens ({n_tok} tokens), batch {BATCH}, best of 3, {torch.get_num_threads()} threads")
    print(f"   density: {l0:.1f} active latents per token, {per_prompt:.0f} per prompt; coverage {ref.coverage:.1%}")
    names = {"a": "floor: forward to hook + encode", "b": "compute_reference (no embeddings)",
             "c": "naive: run_with_cache_with_saes per prompt", "d": "full forward (batched)"}
    for k, name in names.items():
        print(f"   ({k}) {name:45s} {t[k]:7.2f} s  {n_tok / t[k]:8.0f} tok/s")
    print(f"   (b)/(a) time ratio {t['b'] / t['a']:.2f} (1 = at the floor);  (c)/(b) speed-up over naive "
          f"{t['c'] / t['b']:.2f}x;  (d)/(b) {t['d'] / t['b']:.2f}x")
    emb = load_embedder()
    te = best_of(lambda: emb.encode(prompts, batch_size=64, normalize_embeddings=True), n=1)
    print(f"   embedding the same {N_PROMPTS} prompts with all-MiniLM-L6-v2: {te:.2f} s ({N_PROMPTS / te:.0f} prompts/s)")
    return t


def synthetic_reference(n=8192, d=D_SAE, per_prompt=1000, dim=384, seed=0) -> ReferenceSet:
    "Random summaries with ~per_prompt active latents each; latent firing frequencies follow a power law."
    g = torch.Generator().manual_seed(seed)
    probs = (torch.arange(d, dtype=torch.float64) + 10) ** -0.8
    probs = probs[torch.randperm(d, generator=g)]
    rows = []
    for start in range(0, n, 512):
        m = min(512, n - start)
        cols = torch.multinomial(probs.expand(m, d), per_prompt, replacement=False, generator=g).sort(1).values
        vals = torch.rand(m, per_prompt, generator=g) ** 4  # a few strong latents, many weak ones
        vals = vals / vals.sum(1, keepdim=True)
        rows += [(cols[i], vals[i]) for i in range(m)]
    s = _rows_to_csr(rows, d)
    e = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    return ReferenceSet.from_summaries(s, e)


def scoring_bench():
    t0 = time.perf_counter()
    ref = synthetic_reference()
    build = time.perf_counter() - t0
    emb = load_embedder()
    med = list(load_texts("wiki_medical_terms")["text"])[:20]
    pool = (list(load_texts("medquad", split="definitions")["text"][:100]) + list(load_texts("amazon")["text"][:100])
            + list(load_texts("cola", split="in_domain_dev")["text"][:100])
            + list(load_texts("awesome_chatgpt_prompts")["text"][:100]))
    topics = {f"topic{i:02d}": pool[20 * i:20 * i + 20] for i in range(20)}
    emb.encode(med[:2])  # warm-up

    t_embed = best_of(lambda: emb.encode(med, normalize_embeddings=True))
    t0 = time.perf_counter()
    score_latents(ref, med, emb)  # first call also builds S^T (float64) once per ReferenceSet
    t_first = time.perf_counter() - t0
    t_one = best_of(lambda: score_latents(ref, med, emb))
    t_20 = best_of(lambda: score_latents(ref, topics, emb))
    sc = score_latents(ref, med, emb)
    pre = PrecomputedEmbedder(emb, med + pool)
    t_one_math = best_of(lambda: score_latents(ref, med, pre))
    t_20_math = best_of(lambda: score_latents(ref, topics, pre))
    t_embed_400 = best_of(lambda: emb.encode(pool, normalize_embeddings=True), n=1)
    st = summaries_by_latent(ref)
    st_bytes = sum(x.numel() * x.element_size() for x in (st.crow_indices(), st.col_indices(), st.values()))
    s = ref.summaries
    s_bytes = sum(x.numel() * x.element_size() for x in (s.crow_indices(), s.col_indices(), s.values()))

    print(f"\n== scoring: synthetic ReferenceSet {ref.n_prompts} prompts x {ref.d_sae} latents, "
          f"{s.values().numel() / ref.n_prompts:.0f} active per prompt, coverage {ref.coverage:.1%}, "
          f"{int(sc.eligible.sum())} eligible at min_prompts=20 (built in {build:.1f} s)")
    print(f"   embed 20 wiki_medical_terms texts alone:           {t_embed:6.3f} s")
    print(f"   score_latents, 1 topic x 20 texts, first call:     {t_first:6.3f} s  (includes building S^T)")
    print(f"   score_latents, 1 topic x 20 texts, later calls:    {t_one:6.3f} s  (embedding included; target <= 1 s)")
    print(f"   score_latents, 20 topics x 20 texts, one call:     {t_20:6.3f} s  ({t_20 / 20:.3f} s per topic)")
    print(f"   of which embedding the 400 texts:                  {t_embed_400:6.3f} s")
    print(f"   score_latents without embedding (precomputed): 1 topic {t_one_math:.3f} s, 20 topics {t_20_math:.3f} s")
    print(f"   memory: sparse summaries {s_bytes / 2**20:.1f} MiB (int32 indices, float32 values); whole ReferenceSet "
          f"{ref.nbytes / 2**20:.1f} MiB (+ embeddings); scoring's cached S^T (float64) {st_bytes / 2**20:.1f} MiB; "
          f"dense would be {ref.n_prompts * ref.d_sae * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    reference_pass_bench()
    scoring_bench()
