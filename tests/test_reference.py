import json
import logging
import shutil
from collections import Counter


import pytest
import torch

from saealign import reference as R
from saealign.activations import pad_right, tokenize
from saealign.embeddings import EmbeddingCache, embedder_key
from saealign.reference import (ReferenceSet, build_reference_prompts, compute_reference, coverage_chart,
                                coverage_curve, summarize_batch)
from saealign.core import load_texts
from saealign.saes import load_sae

MAX_TOKENS = 24  # short prompts keep the pass cheap on a shared 2-core machine


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    "A cache_dir turns on the embeddings cache under cache_root(): keep it out of the user's cache."
    root = tmp_path_factory.mktemp("saealign-cache")
    monkeypatch.setenv("SAEALIGN_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def prompts(padded_prompts):
    return padded_prompts


@pytest.fixture(scope="module")
def base(model, sae, embedder, prompts):
    "The uninterrupted reference: batch 32, no cache."
    return compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=8, progress=False)


def dense(ref):
    return ref.summaries.to_dense()


# --- build_reference_prompts -------------------------------------------------------------------

def test_prompts_deterministic_distinct_and_stratified():
    a, b = build_reference_prompts(400, seed=0), build_reference_prompts(400, seed=0)
    assert a == b and len(a) == 400 and len(set(a)) == 400
    assert build_reference_prompts(400, seed=1) != a
    p3 = load_texts("p3")
    template = dict(zip(p3["text"], p3["template"]))
    n_templates = len(set(p3["template"]))
    # round-robin: the first round takes one prompt from every template
    assert len({template[t] for t in a[:n_templates]}) == n_templates
    counts = Counter(template[t] for t in a)
    assert max(counts.values()) - min(counts.values()) <= 1  # ~equal per template (all have >= 2 texts)


def test_prompts_mix_extra_and_dedupe():
    extra = ["my own text"] * 3 + ["  ", "another text"]
    out = build_reference_prompts(700, seed=0, extra=extra)
    assert out.count("my own text") == 1 and "another text" in out and "  " not in out
    with pytest.raises(ValueError, match="distinct non-empty"):
        build_reference_prompts(10**6, seed=0)
    with pytest.raises(ValueError, match="single string"):
        build_reference_prompts(5, extra={"x": "oops"})


# --- the pass ----------------------------------------------------------------------------------

def naive_summary(model, sae, text):
    "Independent path: full forward with the cache, encode, drop special tokens, normalise."
    tokens = model.to_tokens(text)[:, :MAX_TOKENS]
    _, cache = model.run_with_cache(tokens)
    z = sae.encode(cache[sae.cfg.metadata.hook_name])[0]
    keep = ~torch.isin(tokens[0], torch.tensor(model.tokenizer.all_special_ids))
    s = z[keep].sum(0)
    return s / s.sum() if s.sum() > 0 else s


def test_summaries_match_naive_full_forward(model, sae, prompts, base):
    for i in (0, 5, 20):
        torch.testing.assert_close(dense(base)[i], naive_summary(model, sae, prompts[i]), atol=1e-6, rtol=0)


def test_batched_equals_one_at_a_time(model, sae, prompts):
    # Right padding + causal attention: real positions never see the pads, and positions start at 0 as
    # unpadded, so the activations agree up to float rounding of differently shaped matmuls (not bitwise).
    ids, _ = tokenize(model, prompts[:12], MAX_TOKENS)
    assert len({len(x) for x in ids}) > 1  # padding really happens
    tokens, mask = pad_right(ids, 0, "cpu")
    batched = summarize_batch(model, sae, tokens, mask).to_dense()
    for i, x in enumerate(ids):
        t1, m1 = pad_right([x], 0, "cpu")
        torch.testing.assert_close(batched[i], summarize_batch(model, sae, t1, m1).to_dense()[0], atol=1e-6, rtol=0)


def test_rows_normalised_special_tokens_excluded(model, sae, embedder):
    ref = compute_reference(model, sae, ["", "Once upon a time", "Lily"], embedder, progress=False)
    d = dense(ref)
    assert d[0].abs().sum() == 0 and ref.token_counts[0] == 0  # "" is BOS only: nothing left to summarise
    torch.testing.assert_close(d[1:].sum(1), torch.ones(2))
    assert ref.token_counts.tolist()[1:] == [len(model.to_tokens(t)[0]) - 1 for t in ["Once upon a time", "Lily"]]


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_invariance(model, sae, embedder, prompts, base, batch_size):
    ref = compute_reference(model, sae, prompts, embedder, batch_size=batch_size, max_tokens=MAX_TOKENS,
                            chunk_size=8, progress=False)
    torch.testing.assert_close(dense(ref), dense(base), atol=1e-6, rtol=0)
    assert torch.equal(ref.prompt_counts, base.prompt_counts) and ref.fingerprint == base.fingerprint


def test_original_order_kept(model, sae, embedder, prompts, base):
    rev = compute_reference(model, sae, prompts[::-1], embedder, max_tokens=MAX_TOKENS, chunk_size=8, progress=False)
    torch.testing.assert_close(dense(rev), dense(base).flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(rev.embeddings, base.embeddings.flip(0), atol=1e-5, rtol=0)


def test_encode_slicing_invariance(model, sae, embedder, prompts, base, monkeypatch):
    monkeypatch.setattr(R, "ENCODE_TOKENS", 1)  # one prompt per encode call
    ref = compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=8, progress=False)
    torch.testing.assert_close(dense(ref), dense(base), atol=1e-6, rtol=0)


def test_compute_reference_bad_inputs(model, sae, embedder):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    with pytest.raises(ValueError, match="non-empty list of strings"):
        compute_reference(model, sae, [], embedder, progress=False)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        compute_reference(model, sae, ["ok", None], embedder, progress=False)
    wrong = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16, metadata=SAEMetadata(hook_name="blocks.2.hook_resid_post")))
    with pytest.raises(ValueError, match="d_in=32"):
        compute_reference(model, wrong, ["hi"], embedder, progress=False)
    model.add_sae(sae)
    try:
        with pytest.raises(ValueError, match="reset_saes"):
            compute_reference(model, sae, ["hi"], embedder, progress=False)
    finally:
        model.reset_saes()


def test_truncation_counted(model, prompts, base):
    ids = [model.to_tokens(p, truncate=False)[0] for p in prompts]
    assert base.meta["n_truncated"] == sum(len(x) > MAX_TOKENS for x in ids) > 0
    assert base.token_counts.max() <= MAX_TOKENS - 1  # BOS is one of the MAX_TOKENS and is not counted


def test_embeddings_unit_and_from_embedder(embedder, prompts, base):
    torch.testing.assert_close(base.embeddings.norm(dim=1), torch.ones(len(prompts)))
    # all-MiniLM-L6-v2 normalises by itself: the raw encode equals the stored rows
    raw = torch.as_tensor(embedder.encode(prompts[:3]))
    torch.testing.assert_close(base.embeddings[:3], raw, atol=1e-5, rtol=0)


def test_prompt_counts_and_coverage(base):
    d = dense(base)
    assert torch.equal(base.prompt_counts, (d > 0).sum(0))
    assert base.coverage == (d.sum(0) > 0).float().mean().item()


# --- the cache ---------------------------------------------------------------------------------

class Killed(RuntimeError):
    pass


def test_resume_after_kill_equals_uninterrupted(model, sae, embedder, prompts, base, tmp_path, monkeypatch):
    real, calls = R.compute_chunk, []

    def dies_after_two(*a, **k):
        if len(calls) == 2:
            raise Killed
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(R, "compute_chunk", dies_after_two)
    with pytest.raises(Killed):
        compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=8, cache_dir=tmp_path,
                          progress=False)
    assert sorted(p.name for p in tmp_path.glob("chunk_*")) == ["chunk_00000.safetensors", "chunk_00001.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "manifest.json").read_text())["fingerprint"] == base.fingerprint

    calls.clear()
    monkeypatch.setattr(R, "compute_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=8, cache_dir=tmp_path,
                            progress=False)
    assert len(calls) == 1  # only the third chunk (prompts 16..20) was computed
    assert torch.equal(dense(ref), dense(base)) and torch.equal(ref.embeddings, base.embeddings)
    assert torch.equal(ref.token_counts, base.token_counts) and ref.meta == base.meta


def test_fingerprint_mismatch_recomputes(model, sae, embedder, prompts, tmp_path, monkeypatch, caplog):
    kw = dict(chunk_size=8, cache_dir=tmp_path, progress=False)
    compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, **kw)
    real, calls = R.compute_chunk, []
    monkeypatch.setattr(R, "compute_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))

    compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, **kw)
    assert calls == []  # same fingerprint: everything reused

    other = load_sae(model=model)
    with torch.no_grad():
        other.W_enc[0, 0] += 1.0  # one weight differs: another SAE
    with caplog.at_level(logging.WARNING, logger="saealign.reference"):
        ref = compute_reference(model, other, prompts, embedder, max_tokens=MAX_TOKENS, **kw)
    assert "recomputing from scratch" in caplog.text and len(calls) == 3
    fresh = compute_reference(model, other, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=8, progress=False)
    assert torch.equal(dense(ref), dense(fresh))


def test_stale_chunk_without_manifest_not_reused(model, sae, embedder, prompts, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    compute_reference(model, sae, prompts[:8], embedder, max_tokens=MAX_TOKENS, chunk_size=8, cache_dir=a, progress=False)
    b.mkdir()
    shutil.copy(a / ".saealign-cache", b / ".saealign-cache")  # b is a saealign cache too
    shutil.copy(a / "chunk_00000.safetensors", b / "chunk_00000.safetensors")  # a chunk of other prompts
    real, calls = R.compute_chunk, []
    monkeypatch.setattr(R, "compute_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = compute_reference(model, sae, prompts[8:16], embedder, max_tokens=MAX_TOKENS, chunk_size=8, cache_dir=b,
                            progress=False)
    assert len(calls) == 1 and ref.prompts == prompts[8:16]


def test_fingerprint_depends_on_inputs(model, sae, embedder, prompts, base):
    def fp(**kw):
        args = dict(max_tokens=MAX_TOKENS, chunk_size=8) | kw
        return compute_reference(model, sae, prompts[:2], embedder, progress=False, **args).fingerprint
    f0 = fp()
    assert fp() == f0
    assert len({f0, fp(max_tokens=MAX_TOKENS + 1), fp(chunk_size=4)}) == 3
    assert compute_reference(model, sae, prompts[:2], None, max_tokens=MAX_TOKENS, chunk_size=8,
                             progress=False).fingerprint != f0


# --- the embeddings cache ----------------------------------------------------------------------

class CountingEmbedder:
    "Passes everything to the real embedder and counts the texts given to encode."

    def __init__(self, inner):
        self.inner, self.texts = inner, Counter()

    def encode(self, texts, **kw):
        self.texts.update(texts)
        return self.inner.encode(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def sae2(model, sae):
    "The other shipped SAE: same model, another layer."
    from saealign.saes import shipped_sae_ids
    (other,) = [i for i in shipped_sae_ids("saealign-stories260K") if i != sae.cfg.metadata.hook_name]
    return load_sae(sae_id=other, model=model)


def emb_files(path):
    return sorted(path.glob("*.safetensors"))


def test_two_saes_embed_each_prompt_once(model, sae, sae2, embedder, prompts, base, tmp_path, private_cache):
    counting = CountingEmbedder(embedder)
    kw = dict(max_tokens=MAX_TOKENS, chunk_size=8, progress=False)
    one = compute_reference(model, sae, prompts, counting, cache_dir=tmp_path / "l0", **kw)
    two = compute_reference(model, sae2, prompts, counting, cache_dir=tmp_path / "l2", **kw)
    assert len(set(prompts)) == len(prompts) and counting.texts == Counter(prompts)  # each prompt once overall
    assert len(emb_files(private_cache / "embeddings")) == 3  # default place: cache_root()/embeddings, one per chunk
    assert not list((private_cache / "embeddings").glob("*.tmp"))
    # bit-identical to a fresh computation, and the fingerprints are those of a run without the cache
    fresh2 = compute_reference(model, sae2, prompts, embedder, **kw)
    assert torch.equal(one.embeddings, base.embeddings) and torch.equal(two.embeddings, fresh2.embeddings)
    assert torch.equal(two.embeddings, base.embeddings)
    assert one.fingerprint == base.fingerprint and two.fingerprint == fresh2.fingerprint != one.fingerprint
    assert torch.equal(dense(two), dense(fresh2)) and two.meta == fresh2.meta


def test_embedding_cache_options(model, sae, embedder, prompts, tmp_path, private_cache):
    counting = CountingEmbedder(embedder)
    kw = dict(max_tokens=MAX_TOKENS, chunk_size=8, progress=False)
    compute_reference(model, sae, prompts[:8], counting, **kw)  # no cache_dir: no embeddings cache either
    compute_reference(model, sae, prompts[:8], counting, cache_dir=tmp_path / "a", embedding_cache=False, **kw)
    assert not (private_cache / "embeddings").exists() and sum(counting.texts.values()) == 16
    compute_reference(model, sae, prompts[:8], counting, embedding_cache=tmp_path / "emb", **kw)  # explicit dir
    compute_reference(model, sae, prompts[:8], counting, embedding_cache=tmp_path / "emb", **kw)
    assert sum(counting.texts.values()) == 24 and len(emb_files(tmp_path / "emb")) == 1


def _flip_last_byte(p):
    b = bytearray(p.read_bytes())
    b[-1] ^= 0x01  # the last byte of the last embedding
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other chunk's file"])
def test_tampered_embeddings_recomputed(model, sae, embedder, prompts, base, tmp_path, caplog, damage):
    counting = CountingEmbedder(embedder)
    kw = dict(max_tokens=MAX_TOKENS, chunk_size=8, progress=False, embedding_cache=tmp_path)
    compute_reference(model, sae, prompts, counting, **kw)
    cache = EmbeddingCache(tmp_path, embedder)
    first, second = (tmp_path / f"{cache.key(prompts[i:i + 8])}.safetensors" for i in (0, 8))
    if damage == "flipped byte":
        _flip_last_byte(second)
    elif damage == "truncated":
        second.write_bytes(second.read_bytes()[:-100])
    else:
        second.write_bytes(first.read_bytes())  # a valid file, but of other texts
    counting.texts.clear()
    with caplog.at_level(logging.WARNING, logger="saealign.embeddings"):
        ref = compute_reference(model, sae, prompts, counting, **kw)
    assert "recomputing" in caplog.text and second.name in caplog.text
    assert counting.texts == Counter(prompts[8:16])  # only the damaged chunk was embedded again
    assert torch.equal(ref.embeddings, base.embeddings)
    counting.texts.clear()
    caplog.clear()
    compute_reference(model, sae, prompts, counting, **kw)  # the file was rewritten whole
    assert not counting.texts and "recomputing" not in caplog.text


def test_embeddings_not_reused_across_texts_or_embedders(model, sae, embedder, prompts, base, tmp_path):
    import copy
    counting = CountingEmbedder(embedder)
    kw = dict(max_tokens=MAX_TOKENS, chunk_size=8, progress=False, embedding_cache=tmp_path)
    compute_reference(model, sae, prompts, counting, **kw)
    counting.texts.clear()
    changed = prompts[:8] + ["A new prompt."] + prompts[9:]  # one text of the second chunk differs
    ref = compute_reference(model, sae, changed, counting, **kw)
    assert counting.texts == Counter(changed[8:16])
    assert torch.equal(ref.embeddings[:8], base.embeddings[:8]) and torch.equal(ref.embeddings[16:], base.embeddings[16:])
    counting.texts.clear()
    compute_reference(model, sae, prompts[1:] + prompts[:1], counting, **kw)  # the same texts, other chunks
    assert counting.texts == Counter(prompts)

    other = copy.deepcopy(embedder)
    with torch.no_grad():
        ln = next(p for n, p in other.named_parameters() if n.endswith("embeddings.LayerNorm.bias"))
        ln[0] += 1.0  # one weight differs (element 0 is always in the digest's sample), on every token's path
    shorter = copy.deepcopy(embedder)
    shorter.max_seq_length = 8  # truncation: another embedding of the long prompts, same weights
    assert len({embedder_key(e) for e in (embedder, other, shorter)}) == 3
    for e in (other, shorter):
        counting = CountingEmbedder(e)
        ref = compute_reference(model, sae, prompts, counting, **kw)
        assert counting.texts == Counter(prompts) and not torch.equal(ref.embeddings, base.embeddings)
    assert len(emb_files(tmp_path)) == 3 + 1 + 3 + 3 + 3


# --- ReferenceSet ------------------------------------------------------------------------------

def test_save_load_roundtrip(base, tmp_path):
    base.save(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    back = ReferenceSet.load(tmp_path)
    assert torch.equal(dense(back), dense(base)) and torch.equal(back.prompt_counts, base.prompt_counts)
    assert torch.equal(back.embeddings, base.embeddings) and torch.equal(back.token_counts, base.token_counts)
    assert (back.prompts, back.fingerprint, back.meta, back.coverage) == (base.prompts, base.fingerprint,
                                                                         base.meta, base.coverage)
    info = json.loads((tmp_path / "reference.json").read_text())
    info["fingerprint"] = "0" * 64
    (tmp_path / "reference.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="reference.json was changed after it was saved"):
        ReferenceSet.load(tmp_path)


def test_referenceset_checks_shapes():
    with pytest.raises(ValueError, match="embeddings rows"):
        ReferenceSet.from_summaries(torch.eye(3), torch.zeros(2, 4))


# --- coverage ----------------------------------------------------------------------------------

def toy_ref():
    s = torch.zeros(4, 6)
    s[0, 0] = s[1, 1] = s[2, 2] = 1.0
    s[3, [0, 3]] = 0.5  # latents 4 and 5 never fire
    return ReferenceSet.from_summaries(s, torch.zeros(4, 2))


def test_coverage_curve_known_values():
    ref = toy_ref()
    assert ref.coverage == 4 / 6 and ref.prompt_counts.tolist() == [2, 1, 1, 1, 0, 0]
    rows = coverage_curve(ref, [1, 2, 4], n_samples=3, seed=0)
    assert len(rows) == 9 and rows == coverage_curve(ref, [1, 2, 4], n_samples=3, seed=0)
    by = {(r["size"], r["sample"]): r["coverage"] for r in rows}
    assert all(by[(4, s)] == 4 / 6 for s in range(3))  # all prompts: the full coverage
    assert all(by[(1, s)] in (1 / 6, 2 / 6) for s in range(3))  # one prompt: its own latents
    with pytest.raises(ValueError, match="sizes"):
        coverage_curve(ref, [5])
    spec = coverage_chart(rows).to_dict()
    # the band embeds its ends, the line its mean and its tooltip's columns: no per-sample rows
    assert [set(spec["datasets"][layer["data"]["name"]][0]) for layer in spec["layer"]] == [
        {"size", "min", "max"}, {"size", "mean", "min", "max"}]
    assert sum(len(spec["datasets"][layer["data"]["name"]]) for layer in spec["layer"]) == 2 * 3  # one row per size


def test_model_stories_sampled_once_then_loaded(model, tmp_path, monkeypatch):
    "The stories of the default reference are cached, so a second call loads them instead of sampling."
    import saealign.corpus as E
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    first = R.model_stories(model, 6, length=16, seed=3)
    monkeypatch.setattr(E, "sample_stories", lambda *a, **k: pytest.fail("sampled again despite the cache"))
    assert R.model_stories(model, 6, length=16, seed=3) == first and first
    assert len(list((tmp_path / "reference" / "stories").glob("*.safetensors"))) == 1
