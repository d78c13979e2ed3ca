import math


import numpy as np
import pytest
import torch

from saealign.reference import ReferenceSet, compute_reference
from saealign.saes import load_sae
from saealign.scoring import (LatentScores, contrastive_scores, kendall_tau, score_latents, score_violin, strawman_latents,
                     top_latent_tokens, topic_distance_table, topk_token_share, validation_chart, validation_curve)


class FakeEmbedder:
    "encode() looks texts up in a table of designed vectors: distances known by construction."
    def __init__(self, table):
        self.table = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in table.items()}
        self.dim = len(next(iter(self.table.values())))

    def get_embedding_dimension(self):
        return self.dim

    def state_dict(self):
        return {}

    def encode(self, texts, normalize_embeddings=False, **kw):
        e = torch.stack([self.table[t] for t in texts])
        return torch.nn.functional.normalize(e, dim=1) if normalize_embeddings else e


# --- a hand-built case: 6 prompts x 3 latents, embeddings on the unit circle -----------------------
# p0, p1 sit on the topic (distance 0), p2, p3 at 90 degrees (sqrt 2), p4, p5 opposite (2).
S = torch.tensor([[0.8, 0.2, 0.0],
                  [1.0, 0.0, 0.0],
                  [0.5, 0.5, 0.0],
                  [0.0, 0.5, 0.5],
                  [0.0, 0.0, 1.0],
                  [0.0, 0.25, 0.75]])
E = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [-1, 0], [-1, 0]], dtype=torch.float32)
EMB = FakeEmbedder({"topic": [1, 0], "side": [0, 1], "far": [-1, 0], "other": [0, -1]})
R2 = math.sqrt(2)


def hand_ref(perm=None):
    perm = torch.arange(6) if perm is None else perm
    return ReferenceSet.from_summaries(S[perm], E[perm], prompts=[f"p{i}" for i in perm.tolist()])


def test_hand_built_k1():
    sc = score_latents(hand_ref(), ["topic"], EMB, min_prompts=0)
    g = [(0.5 * R2) / 2.3, (0.5 * R2 + 0.5 * R2 + 0.25 * 2) / 1.45, (0.5 * R2 + 2 * 1.0 + 2 * 0.75) / 2.25]
    torch.testing.assert_close(sc.g, torch.tensor(g), atol=1e-6, rtol=0)
    torch.testing.assert_close(sc.scores, torch.tensor([1.0, 1 - (g[1] - g[0]) / (g[2] - g[0]), 0.0]), atol=1e-6, rtol=0)
    assert sc.top(3).tolist() == [0, 1, 2] and sc.eligible.all()


def test_hand_built_k2_and_nearest_text():
    # k=2 squares the distances; with two alignment texts each prompt takes the nearer one ("side" -> p2, p3 at 0)
    sc = score_latents(hand_ref(), ["topic"], EMB, min_prompts=0, distance_power=2)
    g = [(0.5 * 2) / 2.3, (0.5 * 2 + 0.5 * 2 + 0.25 * 4) / 1.45, (0.5 * 2 + 4 * 1.75) / 2.25]
    torch.testing.assert_close(sc.g, torch.tensor(g), atol=1e-6, rtol=0)
    sc2 = score_latents(hand_ref(), ["topic", "side"], EMB, min_prompts=0)
    g2 = [0.0, (0.25 * R2) / 1.45, (1.0 * R2 + 0.75 * R2) / 2.25]  # p3 at 0, p4 and p5 at sqrt 2 from "side"
    torch.testing.assert_close(sc2.g, torch.tensor(g2), atol=1e-6, rtol=0)


def test_min_prompts_eligibility_and_ties():
    ref = hand_ref()  # prompt counts: 3, 4, 3
    assert ref.prompt_counts.tolist() == [3, 4, 3]
    with pytest.warns(UserWarning, match="same g"):
        sc = score_latents(ref, ["topic"], EMB, min_prompts=4)
    assert sc.eligible.tolist() == [False, True, False] and sc.scores.tolist() == [0.0, 1.0, 0.0]
    assert sc.top(3).tolist() == [1]  # ineligible latents are never "top"
    with pytest.raises(ValueError, match=r"min_prompts=5 .* fired on is 4 .*coverage 100.0%"):
        score_latents(ref, ["topic"], EMB, min_prompts=5)


def test_never_fired_latent_ineligible_even_at_min_prompts_0():
    s = torch.cat([S, torch.zeros(6, 1)], 1)
    sc = score_latents(ReferenceSet.from_summaries(s, E), ["topic"], EMB, min_prompts=0)
    assert not sc.eligible[3] and sc.scores[3] == 0 and torch.isnan(sc.g[3])


def numpy_scores(S, E, A, min_prompts, k):
    "Equations (1)-(2) written densely in numpy, independently of the sparse implementation."
    S, E, A = (np.asarray(x, dtype=np.float64) for x in (S, E, A))
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    dist = np.sqrt(((E[:, None, :] - A[None, :, :]) ** 2).sum(-1)).min(1)
    with np.errstate(invalid="ignore"):  # never-fired latents: 0/0, ineligible anyway
        g = (S * dist[:, None] ** k).sum(0) / S.sum(0)
    elig = (S > 0).sum(0) >= max(min_prompts, 1)
    s = np.zeros(S.shape[1])
    s[elig] = 1 - (g[elig] - g[elig].min()) / (g[elig].max() - g[elig].min())
    return s, elig


@pytest.mark.parametrize("k", [1, 2])
def test_matches_dense_numpy_on_random_sparse(k):
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(60, 40, generator=gen) * (torch.rand(60, 40, generator=gen) < torch.linspace(0.02, 0.3, 40))
    S_ = raw / raw.sum(1, keepdim=True).clamp_min(1e-12)
    E_ = torch.randn(60, 8, generator=gen)
    A_ = torch.randn(3, 8, generator=gen)
    emb = FakeEmbedder({f"a{i}": A_[i] for i in range(3)})
    sc = score_latents(ReferenceSet.from_summaries(S_, E_ / E_.norm(dim=1, keepdim=True)), ["a0", "a1", "a2"], emb,
                       min_prompts=5, distance_power=k)
    want, elig = numpy_scores(S_, E_, A_, 5, k)
    assert sc.eligible.numpy().tolist() == elig.tolist() and 0 < elig.sum() < 40
    np.testing.assert_allclose(sc.scores.numpy(), want, atol=1e-6)
    assert sc.scores.min() >= 0 and sc.scores.max() <= 1
    assert sc.scores[sc.eligible].max() == 1 and sc.scores[sc.eligible].min() == 0


def test_permutation_invariance_and_multi_topic():
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = score_latents(hand_ref(), ["topic"], EMB, min_prompts=0)
    b = score_latents(hand_ref(perm), ["topic"], EMB, min_prompts=0)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=0)
    many = score_latents(hand_ref(), {"t": ["topic"], "s": ["side", "other"], "f": ["far"]}, EMB, min_prompts=0)
    assert list(many) == ["t", "s", "f"] and many["t"].topic == "t" and many["s"].align_texts == ["side", "other"]
    for name, texts in {"t": ["topic"], "s": ["side", "other"], "f": ["far"]}.items():
        one = score_latents(hand_ref(), texts, EMB, min_prompts=0)
        torch.testing.assert_close(many[name].scores, one.scores, atol=1e-6, rtol=0)  # other matmul shapes
    assert many["f"].top(1).tolist() == [2]  # far topic: latent 2 is the aligned one


@pytest.mark.parametrize("texts, match", [([], "empty"), (["topic", "  "], "positions \\[1\\]"), (["", "topic"], "positions \\[0\\]"),
                                          ("topic", "single string"), ({}, "empty dict"), ({"x": []}, "empty")])
def test_bad_align_texts(texts, match):
    with pytest.raises(ValueError, match=match):
        score_latents(hand_ref(), texts, EMB, min_prompts=0)


def test_bad_settings_and_embedder():
    with pytest.raises(ValueError, match="min_prompts"):
        score_latents(hand_ref(), ["topic"], EMB, min_prompts=-1)
    with pytest.raises(ValueError, match="distance_power"):
        score_latents(hand_ref(), ["topic"], EMB, distance_power=0)
    emb3 = FakeEmbedder({"topic": [1, 0, 0]})
    with pytest.raises(ValueError, match="3-d embeddings but the ReferenceSet holds 2-d"):
        score_latents(hand_ref(), ["topic"], emb3, min_prompts=0)
    no_emb = ReferenceSet.from_summaries(S, torch.zeros(6, 0))
    with pytest.raises(ValueError, match="no prompt embeddings"):
        score_latents(no_emb, ["topic"], EMB, min_prompts=0)


def test_save_load_roundtrip(tmp_path):
    s = torch.cat([S, torch.zeros(6, 1)], 1)  # a never-fired latent: g is NaN and must survive the round trip
    sc = score_latents(ReferenceSet.from_summaries(s, E), ["topic", "side"], EMB, min_prompts=3)
    back = LatentScores.load(sc.save(tmp_path))
    assert torch.equal(back.scores, sc.scores) and torch.equal(back.eligible, sc.eligible)
    assert torch.allclose(back.g, sc.g, equal_nan=True) and torch.isnan(back.g[3])
    assert (back.topic, back.align_texts, back.settings) == (sc.topic, sc.align_texts, sc.settings)


def test_kendall_tau():
    a = torch.tensor([0.1, 0.5, 0.9, 0.3])
    assert kendall_tau(a, a) == pytest.approx(1.0) and kendall_tau(a, -a) == pytest.approx(-1.0)
    mk = lambda s, e: LatentScores(torch.tensor(s), torch.zeros(4), torch.tensor(e), "", [], {})
    x, y = mk([0.2, 0.8, 0.0, 0.5], [True, True, False, True]), mk([0.1, 0.9, 0.7, 0.4], [True, True, True, True])
    assert kendall_tau(x, y) == pytest.approx(1.0)  # latent 2 (ineligible in x) is left out
    assert kendall_tau(x.scores, y.scores) < 1.0


def test_topic_distance_table():
    # A's two texts are orthogonal (intra: sqrt 2, self-pairs excluded); B's coincide at -a1 (2 from a1, sqrt 2 from a2)
    emb = FakeEmbedder({"a1": [1, 0], "a2": [0, 1], "b1": [-1, 0], "b2": [-1, 0]})
    t = topic_distance_table(emb, {"A": ["a1", "a2"], "B": ["b1", "b2"]})
    assert t.loc["A", "A"] == pytest.approx(R2) and t.loc["B", "B"] == pytest.approx(0)
    assert t.loc["A", "B"] == pytest.approx((2 + R2) / 2) == t.loc["B", "A"]


def test_charts_hold_only_what_they_plot():
    by_topic = score_latents(hand_ref(), {"t": ["topic"], "f": ["far"]}, EMB, min_prompts=0)
    violin = score_violin(by_topic, points=10).to_dict()
    assert violin["mark"]["type"] == "area" and violin["encoding"]["column"]["field"] == "config"
    assert len(violin["datasets"][violin["data"]["name"]]) == 2 * 2 * 10  # per config: the density and its mirror
    import pandas as pd
    df = pd.DataFrame({"k": [1, 2, 1, 2], "texts": ["aligned"] * 2 + ["unaligned"] * 2, "share": [.1, .2, .0, .1],
                       "topic": "sea"})
    spec = validation_chart(df).to_dict()
    assert spec["mark"]["type"] == "line" and set(spec["datasets"][spec["data"]["name"]][0]) == {"k", "texts", "share"}


# --- on the real stories260K model and its SAE --------------------------------------------------

STORIES = ["Lily saw a big dog in the park.", "Tom ate a red apple.", "The cat sat on the mat and purred.",
           "Once upon a time there was a little boat.", "Sue liked to sing songs with her mom.",
           "The sun was hot and the kids went to swim.", "Ben found a shiny stone by the river.",
           "The bird flew over the tall tree."]


@pytest.fixture(scope="module")
def ref(model, sae, embedder):
    return compute_reference(model, sae, STORIES, embedder, progress=False)


def kept_latents(model, sae, texts):
    "Independent per-token latents: full forward, encode, drop the BOS/special positions."
    out, toks = [], []
    for t in texts:
        tokens = model.to_tokens(t)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
            z = sae.encode(cache[sae.cfg.metadata.hook_name])[0]
        keep = ~torch.isin(tokens[0], torch.tensor(model.tokenizer.all_special_ids))
        out.append(z[keep])
        toks.append(tokens[0][keep])
    return out, toks


def test_real_scores_and_checks(model, sae, embedder, ref):
    sc = score_latents(ref, ["A dog ran in the park."], embedder, min_prompts=2, model=model, sae=sae)
    assert sc.scores.shape == (sae.cfg.d_sae,) and 0 < int(sc.eligible.sum()) < sae.cfg.d_sae
    assert sc.scores[sc.eligible].max() == 1 and sc.scores[~sc.eligible].abs().sum() == 0
    with pytest.raises(ValueError, match="computed on model 'gpt2-small-random'"):
        score_latents(ReferenceSet(**{**ref.__dict__, "meta": {**ref.meta, "model": "gpt2-small-random"},
                                      "_cache": {}}), ["dog"], embedder, model=model)
    other = load_sae(model=model)
    with torch.no_grad():
        other.b_enc[0] += 1
    with pytest.raises(ValueError, match="another SAE"):
        score_latents(ref, ["dog"], embedder, sae=other)
    with pytest.raises(ValueError, match="embedder differs"):
        score_latents(ReferenceSet(**{**ref.__dict__, "meta": {**ref.meta, "embedder": {"dim": 384, "weights_sample": "x"}},
                                      "_cache": {}}), ["dog"], embedder)


def test_strawman_matches_independent(model, sae):
    texts = STORIES[:3]
    df = strawman_latents(model, sae, texts)
    zs, _ = kept_latents(model, sae, texts)
    mass = sum(z.sum(0) for z in zs)
    n_texts = sum((z > 0).any(0).long() for z in zs)
    top = df.iloc[0]
    assert top.latent == int(mass.argmax()) and top["mass"] == pytest.approx(float(mass.max()), rel=1e-5)
    assert df.set_index("latent")["n_texts"].to_dict() == {i: int(n_texts[i]) for i in torch.nonzero(mass).flatten().tolist()}
    assert df["share"].sum() == pytest.approx(1.0)


def test_topk_token_share_against_independent(model, sae, ref, embedder):
    sc = score_latents(ref, ["A dog ran in the park."], embedder, min_prompts=2)
    texts = STORIES[4:]
    shares = topk_token_share(model, sae, sc, texts, [1, 3, 10_000])
    zs, _ = kept_latents(model, sae, texts)
    z = torch.cat(zs)
    top = sc.top(3)
    assert shares[1] == pytest.approx((z[:, top[0]] > 0).float().mean().item())
    assert shares[3] == pytest.approx((z[:, top] > 0).any(1).float().mean().item())
    assert shares[10_000] == pytest.approx((z[:, sc.eligible] > 0).any(1).float().mean().item())
    assert shares[1] <= shares[3] <= shares[10_000]
    df = validation_curve(model, sae, sc, texts[:2], texts[2:], [1, 3])
    assert df.shape == (4, 3) and set(df["texts"]) == {"aligned", "unaligned"}


def test_top_latent_tokens_against_independent(model, sae, ref, embedder):
    sc = score_latents(ref, ["A dog ran in the park."], embedder, min_prompts=2)
    df = top_latent_tokens(model, sae, sc, STORIES, n_latents=2, n_tokens=3)
    zs, toks = kept_latents(model, sae, STORIES)
    z, tok = torch.cat(zs), torch.cat(toks)
    latent = int(sc.top(1)[0])
    first = df[df["rank"] == 1]
    assert (first["latent"] == latent).all() and len(first) <= 3
    row = first.iloc[0]
    tid = model.tokenizer.convert_tokens_to_ids(row.token)
    assert row["mass"] == pytest.approx(float(z[tok == tid, latent].sum()), rel=1e-5)
    assert row["count"] == int((z[tok == tid, latent] > 0).sum())
    masses = torch.zeros(model.cfg.d_vocab).index_add_(0, tok, z[:, latent])
    assert tid == int(masses.argmax())


# the contrastive score: topics A, B, C on the axes
def unit(*v):
    return torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


# topics A, B, C on the axes; latent i fires only on prompt i
PROMPTS = [unit(1, -1, -1), unit(2, 1, 1), unit(0, 1, 0), unit(0, 0, 1)]  # A-leaning, generic, B, C
TABLE = FakeEmbedder({"A": [1, 0, 0], "B": [0, 1, 0], "C": [0, 0, 1], "A2": [1, 0.2, 0]})


def abc_ref():
    return ReferenceSet.from_summaries(torch.eye(4), torch.stack(PROMPTS))


def test_contrastive_known_answer():
    ref = abc_ref()
    paper = score_latents(ref, ["A"], TABLE, min_prompts=0)
    contrast = contrastive_scores(ref, ["A"], TABLE, {"B": ["B"], "C": ["C"]}, min_prompts=0)
    assert paper.top(2).tolist() == [1, 0]  # the generic prompt is nearer to A
    assert contrast.top(2).tolist() == [0, 1]  # but it is as near to B and C
    axes = torch.eye(3)
    r = torch.tensor([(p - axes[0]).norm() - ((p - axes[1]).norm() + (p - axes[2]).norm()) / 2 for p in PROMPTS])
    torch.testing.assert_close(contrast.g, r, atol=1e-6, rtol=0)
    torch.testing.assert_close(contrast.scores, 1 - (r - r.min()) / (r.max() - r.min()), atol=1e-6, rtol=0)
    assert contrast.settings["background"] == ["B", "C"]


def test_contrastive_dict_form_and_panel_rules():
    ref = abc_ref()
    together = contrastive_scores(ref, {"A": ["A"], "B": ["B"], "C": ["C"]}, TABLE, min_prompts=0)
    for name, others in [("A", ("B", "C")), ("B", ("A", "C"))]:
        alone = contrastive_scores(ref, [name], TABLE, {o: [o] for o in others}, min_prompts=0)
        # one distance matrix for all topics has other shapes than one per topic: equal within float error
        torch.testing.assert_close(together[name].scores, alone.scores, atol=1e-6, rtol=0)
    # a panel entry with the topic's own texts is skipped, so it cannot cancel the topic
    same = contrastive_scores(ref, ["A"], TABLE, {"copy": ["A"], "B": ["B"], "C": ["C"]}, min_prompts=0)
    torch.testing.assert_close(same.scores, together["A"].scores, atol=1e-6, rtol=0)
    # the min over several alignment texts, as in the paper: "A2" is never nearer than "A" for prompt 0..1
    two = contrastive_scores(ref, ["A", "A2"], TABLE, {"B": ["B"], "C": ["C"]}, min_prompts=0)
    assert two.top(1).tolist() == [0]


def test_contrastive_bad_input():
    ref = abc_ref()
    with pytest.raises(ValueError, match="no other topic"):
        contrastive_scores(ref, ["A"], TABLE, {"same": ["A"]}, min_prompts=0)
    with pytest.raises(ValueError, match="background must be a dict"):
        contrastive_scores(ref, ["A"], TABLE, ["B"], min_prompts=0)
    with pytest.raises(ValueError, match="no latent is eligible"):
        contrastive_scores(ref, ["A"], TABLE, {"B": ["B"]}, min_prompts=5)
    with pytest.raises(ValueError, match="single string"):
        contrastive_scores(ref, "A", TABLE, {"B": ["B"]})
