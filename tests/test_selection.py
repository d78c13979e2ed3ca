"""saealign.selection: known answers on hand-built cases, invariants of the new methods, parity with the model."""
import dataclasses
import math

import pytest
import torch

from saealign.reference import ReferenceSet
from saealign.saes import random_sae
from saealign.scoring import LatentScores, score_latents
from saealign.additive import (ActivationMeans, AddSteer, DiffMeans, MatchedSteer, TopicInputs, activation_means,
                               matched_strengths, mean_difference_strengths)
from saealign.methods import OutputClamp, OutputSwap, generate_prompted, prompt_prefix
from saealign.output_scores import (OutputScores, _next_token_logprobs, decoder_directions, distinctive_tokens,
                                    output_latents, output_scores)
from saealign.scoring import contrastive_scores
from saealign.methods import Clamp, Swap
from saealign.registry import make_method, method_names
from saealign.steering import generate, steer


class TableEmbedder:
    "encode() looks texts up in a table of designed vectors: distances known by construction."
    def __init__(self, table):
        self.table = {k: torch.tensor(v, dtype=torch.float32) for k, v in table.items()}

    def get_embedding_dimension(self):
        return 3

    def state_dict(self):
        return {}

    def encode(self, texts, normalize_embeddings=False, **kw):
        e = torch.stack([self.table[t] for t in texts])
        return torch.nn.functional.normalize(e, dim=1) if normalize_embeddings else e


def unit(*v):
    return torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


# topics A, B, C on the axes; latent i fires only on prompt i
PROMPTS = [unit(1, -1, -1), unit(2, 1, 1), unit(0, 1, 0), unit(0, 0, 1)]  # A-leaning, generic, B, C
TABLE = TableEmbedder({"A": [1, 0, 0], "B": [0, 1, 0], "C": [0, 0, 1], "A2": [1, 0.2, 0]})


def hand_ref():
    return ReferenceSet.from_summaries(torch.eye(4), torch.stack(PROMPTS))


def test_contrastive_known_answer():
    ref = hand_ref()
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
    ref = hand_ref()
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
    ref = hand_ref()
    with pytest.raises(ValueError, match="no other topic"):
        contrastive_scores(ref, ["A"], TABLE, {"same": ["A"]}, min_prompts=0)
    with pytest.raises(ValueError, match="background must be a dict"):
        contrastive_scores(ref, ["A"], TABLE, ["B"], min_prompts=0)
    with pytest.raises(ValueError, match="no latent is eligible"):
        contrastive_scores(ref, ["A"], TABLE, {"B": ["B"]}, min_prompts=5)
    with pytest.raises(ValueError, match="single string"):
        contrastive_scores(ref, "A", TABLE, {"B": ["B"]})


def test_decoder_directions_match_the_decoder(model):
    for arch in ("standard", "topk", "jumprelu"):
        s = random_sae(arch, d_in=64, d_sae=32, hook_name="blocks.2.hook_resid_post", k=4, seed=1)
        with torch.no_grad():
            s.W_dec.mul_(torch.linspace(0.5, 2, 32)[:, None])  # decoder rows of different norms
        d = decoder_directions(s, [3, 30])
        rescaled = getattr(s.cfg, "rescale_acts_by_decoder_norm", False)
        want = s.W_dec[[3, 30]] / (s.W_dec[[3, 30]].norm(dim=-1, keepdim=True) if rescaled else 1)
        torch.testing.assert_close(d, want.detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must lie in 0..31"):
        decoder_directions(s, [32])
    with pytest.raises(ValueError, match="must not repeat"):
        decoder_directions(s, [1, 1])


def test_residual_vector_and_addsteer_move_the_output_exactly(model, sae):
    tokens = model.to_tokens(["Once upon a time, there was a dog.", "The sea was blue."])
    real = ~torch.isin(tokens, torch.tensor(sorted(set(model.tokenizer.all_special_ids))))
    name = f"{sae.cfg.metadata.hook_name}.hook_sae_output"
    ones = torch.ones(sae.cfg.d_sae)

    def out(method, output="error"):
        with steer(model, sae, method, output=output), torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=name)
        return logits, cache[name]

    v = torch.randn(sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    for output in ("error", "reconstruction"):
        base_logits, base = out(None, output)
        zero_logits, _ = out(DiffMeans(ones, torch.zeros(sae.cfg.d_in)), output)
        assert torch.equal(zero_logits, base_logits)
        _, moved = out(DiffMeans(ones, v), output)
        torch.testing.assert_close((moved - base)[real], v.expand(int(real.sum()), -1), atol=1e-5, rtol=0)
        assert torch.equal(moved[~real], base[~real])  # BOS and padding bypass the SAE
        j, s = 11, 1.75
        _, raised = out(AddSteer(ones, [j], [s]), output)
        d = decoder_directions(sae, [j])[0]
        torch.testing.assert_close((raised - base)[real], (s * d).expand(int(real.sum()), -1), atol=1e-5, rtol=0)
    # error mode, untouched latents: the spliced output is the model's own activation plus v
    plain = model.run_with_cache(tokens, names_filter=sae.cfg.metadata.hook_name)[1][sae.cfg.metadata.hook_name]
    _, moved = out(DiffMeans(ones, v))
    torch.testing.assert_close(moved[real], (plain + v)[real], atol=1e-5, rtol=0)


def test_strength_zero_is_unsteered_generation(model, sae):
    ones = torch.ones(sae.cfg.d_sae)
    kw = dict(max_new_tokens=12, do_sample=False)
    plain = generate(model, sae, ["Once upon a time", "The dog saw"], None, **kw)
    for method in (DiffMeans(ones, torch.zeros(sae.cfg.d_in)), AddSteer(ones, [1, 2, 3], [0.0, 0.0, 0.0])):
        steered = generate(model, sae, ["Once upon a time", "The dog saw"], method, **kw)
        assert [g.tokens for g in steered] == [g.tokens for g in plain]


def test_methods_bad_input(sae):
    ones = torch.ones(sae.cfg.d_sae)
    with pytest.raises(ValueError, match="2 strengths for 1 latents"):
        AddSteer(ones, [0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        DiffMeans(ones, torch.tensor([math.nan] * sae.cfg.d_in))
    with pytest.raises(ValueError, match="d_in=64"):
        DiffMeans(ones, torch.zeros(3)).check(sae)
    with pytest.raises(ValueError, match="must lie in"):
        AddSteer(ones, [sae.cfg.d_sae], [1.0])


def test_mean_difference_strengths_known_answer():
    align = ActivationMeans(torch.zeros(2), torch.tensor([1.0, 0.5, 0.0]), 10)
    reference = ActivationMeans(torch.zeros(2), torch.tensor([0.25, 1.0, 0.0]), 10)
    assert mean_difference_strengths(align, reference, [0, 1, 2], multiplier=2.0).tolist() == [1.5, 0.0, 0.0]


def test_matched_strengths_known_answer():
    sae = random_sae("standard", d_in=4, d_sae=3, hook_name="blocks.0.hook_resid_post")
    with torch.no_grad():  # latent j decodes to 2·e_j: one unit of it adds a vector of norm 2
        sae.W_dec.copy_(2 * torch.eye(3, 4))
        sae.b_dec.zero_()
    align = ActivationMeans(torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([1.0, 0.5, 2.0]), 10)
    reference = ActivationMeans(torch.zeros(4), torch.tensor([0.25, 1.0, 0.0]), 10)
    # plain [0.75, 0, 2] adds (1.5, 0, 4, 0), norm √18.25; the difference of means has norm 5
    expected = torch.tensor([0.75, 0.0, 2.0]) * 5 / math.sqrt(18.25)
    torch.testing.assert_close(matched_strengths(sae, align, reference, [0, 1, 2]), expected)
    torch.testing.assert_close(matched_strengths(sae, align, reference, [0, 1, 2], multiplier=-2.0), -2 * expected)
    assert matched_strengths(sae, align, reference, [0, 1, 2], multiplier=0.0).abs().sum() == 0
    with pytest.raises(ValueError, match="no direction"):
        matched_strengths(sae, align, reference, [1])


def test_activation_means_parity(model, sae):
    text = "The boat sailed on the big blue sea."
    got = activation_means(model, sae, [text, "Lily saw a big dog."])
    first = activation_means(model, sae, [text])
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=sae.cfg.metadata.hook_name)
    x = cache[sae.cfg.metadata.hook_name][0, 1:]
    torch.testing.assert_close(first.resid, x.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.latents, sae.encode(x).mean(0), atol=1e-5, rtol=0)
    assert got.n_tokens == first.n_tokens + model.to_tokens("Lily saw a big dog.").shape[1] - 1


def test_distinctive_tokens_known_answer(model):
    zzz = model.to_tokens(" zzzqq", prepend_bos=False)[0].tolist()
    align = ["the sea zzzqq zzzqq", "the sea zzzqq"]
    reference = ["the sea"] * 20
    got = distinctive_tokens(model, align, reference, min_ratio=5.0)
    assert set(got.tolist()) <= set(zzz) and len(got) > 0
    assert not set(got.tolist()) & set(model.to_tokens("the sea", prepend_bos=False)[0].tolist())
    with pytest.raises(ValueError, match="no token occurs"):
        distinctive_tokens(model, ["the sea"], reference)


@pytest.fixture(scope="module")
def probe(model):
    "An SAE at the last block whose latent 7 decodes to the unembedding direction of ' fish'; the rest random."
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    s = random_sae("standard", d_in=model.cfg.d_model, d_sae=32, hook_name=hook, seed=3)
    target = model.to_tokens(" fish", prepend_bos=False)[0, 0]
    with torch.no_grad():
        s.W_dec[7] = model.W_U[:, target] / model.W_U[:, target].norm()
    return s, int(target)


NEUTRAL = ["Once upon a time", "One day, a little girl", "Tom and his mom went", "The dog saw"]


def test_output_score_known_answer(model, probe, tmp_path):
    s, target = probe
    out = output_scores(model, s, torch.ones(32), ["-"], NEUTRAL, n_latents=32, tokens=[target], cache_dir=tmp_path)
    assert out.top(1).tolist() == [7] and out.scores[7] > 1 and not out.cached
    assert sorted(out.latents.tolist()) == list(range(32)) and out.seconds > 0
    # batching does not change the answer; the cache returns the same numbers
    one_by_one = output_scores(model, s, torch.ones(32), ["-"], NEUTRAL, n_latents=32, tokens=[target],
                               latents_per_batch=1, cache_dir=False)
    torch.testing.assert_close(one_by_one.scores, out.scores, atol=1e-4, rtol=0)
    again = output_scores(model, s, torch.ones(32), ["-"], NEUTRAL, n_latents=32, tokens=[target], cache_dir=tmp_path)
    assert again.cached and torch.equal(again.scores, out.scores) and torch.equal(again.kl, out.kl)
    # only the n best latents by paper score are measured; the rest are NaN
    scores = torch.zeros(32)
    scores[[7, 3]] = torch.tensor([0.9, 1.0])
    two = output_scores(model, s, scores, ["-"], NEUTRAL, n_latents=2, tokens=[target], cache_dir=False)
    assert two.latents.tolist() == [3, 7] and torch.isnan(two.scores).sum() == 30 and two.top(1).tolist() == [7]


def test_output_score_zero_push_and_bad_input(model, probe):
    s, target = probe
    still = output_scores(model, s, torch.ones(32), ["-"], NEUTRAL, n_latents=4, tokens=[target], amplify=0.0,
                          cache_dir=False)
    assert still.scores[still.latents].abs().max() < 1e-5 and still.kl[still.latents].abs().max() < 1e-5
    with pytest.raises(ValueError, match="reference_texts"):
        output_scores(model, s, torch.ones(32), ["-"], NEUTRAL, cache_dir=False)
    with pytest.raises(ValueError, match="tokens must lie in"):
        output_scores(model, s, torch.ones(32), ["-"], NEUTRAL, tokens=[10**6], cache_dir=False)
    with pytest.raises(ValueError, match="32 scores|31 scores"):
        output_scores(model, s, torch.ones(31), ["-"], NEUTRAL, tokens=[target], cache_dir=False)


def test_next_token_logprobs_parity_with_padding(model):
    from saealign.activations import pad_right
    ids = [model.to_tokens(p)[0] for p in NEUTRAL]
    tokens, mask = pad_right(ids, 0, "cpu")
    lp = _next_token_logprobs(model, "blocks.2.hook_resid_post", tokens, mask, mask.sum(1) - 1)
    for i, x in enumerate(ids):
        torch.testing.assert_close(lp[i], model(x[None])[0, -1].log_softmax(-1), atol=1e-5, rtol=1e-5)


def fake_output(d_sae, latents, gains):
    scores = torch.full((d_sae,), torch.nan)
    scores[latents] = torch.tensor(gains)
    return OutputScores(scores, torch.zeros(d_sae), torch.tensor(latents), torch.tensor([5]), {}, 0.0)


def test_output_latents_rule_and_restricted_methods(model, sae):
    out = fake_output(sae.cfg.d_sae, [4, 9, 2, 6], [0.5, -1.0, 2.0, 0.1])  # median (lower) 0.1
    assert output_latents(out).tolist() == [2, 4, 6]
    scores = torch.linspace(0, 1, sae.cfg.d_sae)
    swap = OutputSwap(scores, out)
    assert swap.scores[9] == 0 and torch.equal(swap.scores[[2, 4, 6]], scores[[2, 4, 6]])
    keep = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    keep[9] = False
    assert torch.equal(swap.scores[keep], scores[keep])
    assert OutputClamp(scores, out, top_n=2).latents.tolist() == [6, 4]  # best paper scores within the set
    with pytest.raises(ValueError, match="every output score <= 0"):
        OutputSwap(scores, fake_output(sae.cfg.d_sae, [1, 2], [-1.0, 0.0]))


def test_restricted_swap_with_every_latent_passing_is_swap(model, sae):
    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    latents = torch.argsort(scores, descending=True)[:50].tolist()
    out = fake_output(sae.cfg.d_sae, latents, [1.0] * 50)
    assert sorted(output_latents(out).tolist()) == sorted(latents)
    kw = dict(max_new_tokens=12, do_sample=False)
    a = generate(model, sae, ["Once upon a time", "The dog saw"], OutputSwap(scores, out), **kw)
    b = generate(model, sae, ["Once upon a time", "The dog saw"], Swap(scores), **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    clamp = OutputClamp(scores, out, top_n=5)
    assert torch.equal(clamp.latents, Clamp(scores, top_n=5).latents)


def test_prompting(model):
    prefix = prompt_prefix(["The sea was blue.", "  A boat sailed.  ", "Fish swam."], n_texts=2)
    assert prefix == "The sea was blue.\nA boat sailed.\n\n"
    assert prompt_prefix(topic=" A story about the sea. ") == "A story about the sea.\n\n"
    got = generate_prompted(model, ["Once upon a time", "The dog saw"], prefix, max_new_tokens=10, seed=3)
    want = generate(model, None, [prefix + "Once upon a time", prefix + "The dog saw"], max_new_tokens=10, seed=3)
    assert [g.prompt for g in got] == ["Once upon a time", "The dog saw"] and got[0].method == "Prompting"
    assert [(g.tokens, g.continuation) for g in got] == [(g.tokens, g.continuation) for g in want]
    with pytest.raises(ValueError, match="either align_texts or a topic"):
        prompt_prefix(["a"], topic="b")
    with pytest.raises(ValueError, match="do not pass sae"):
        generate_prompted(model, ["x"], prefix, sae=object())


def test_every_registered_method_from_topic_inputs(model, sae):
    ref = ReferenceSet.from_summaries(torch.eye(sae.cfg.d_sae)[:40] + 0.01, torch.nn.functional.normalize(
        torch.randn(40, 384, generator=torch.Generator().manual_seed(0)), dim=1), prompts=[f"A story {i}." for i in range(40)])
    scores = LatentScores(torch.linspace(1, 0, sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae),
                          torch.ones(sae.cfg.d_sae, dtype=torch.bool), "sea", [], {})
    out = fake_output(sae.cfg.d_sae, list(range(10)), [1.0, 2.0, 0.5, 3.0, -1.0, 0.0, 4.0, 0.2, 0.1, 5.0])
    texts = ["The boat sailed on the big blue sea.", "Fish swam in the cold salty water."]
    inputs = TopicInputs(model, sae, ref, texts, None, given_scores=scores, given_output=out)
    # the calibration chapter's steers calibrate with the CoLA classifier: tested there (03d)
    methods = {name: make_method(name, inputs) for name in method_names() if not name.startswith("TopicSteer")}
    assert {"Swap", "Clamp", "Weight", "SAE", "OutputSwap", "OutputClamp", "AddSteer", "MatchedSteer", "DiffMeans"} <= set(methods)
    assert all(type(m).__name__ == name for name, m in methods.items() if name != "SAE")
    assert sorted(methods["AddSteer"].latents.tolist()) == sorted(output_latents(out).tolist())
    align, refm = activation_means(model, sae, texts), activation_means(model, sae, ref.prompts)
    torch.testing.assert_close(methods["DiffMeans"].vector, align.resid - refm.resid, atol=1e-6, rtol=0)
    matched = methods["MatchedSteer"]
    assert isinstance(matched, AddSteer) and matched.latents.tolist() == methods["AddSteer"].latents.tolist()
    added = (matched.strengths[:, None] * decoder_directions(sae, matched.latents)).sum(0)
    torch.testing.assert_close(added.norm(), methods["DiffMeans"].vector.norm(), rtol=1e-4, atol=0)
    assert make_method("Clamp", inputs, top_n=2).latents.tolist() == [0, 1]
    for m in methods.values():
        assert len(generate(model, sae, "Once upon a time", m, max_new_tokens=4)[0].tokens) == 4
    with pytest.raises(ValueError, match="unknown steering method 'Steer'"):
        make_method("Steer", inputs)
    with pytest.raises(ValueError, match="DiffMeans is built from a TopicInputs"):
        make_method("DiffMeans", scores)
    with pytest.raises(ValueError, match="multiplier"):
        TopicInputs(model, sae, ref, texts, None, multiplier=float("nan"))


def test_grid_measures_reference_means_once_for_all_topics(model, sae, embedder, monkeypatch, tmp_path):
    """They depend only on the SAE: two topics running DiffMeans measure the reference once, each topic's texts once;
    a second grid finds the reference's on disk."""
    import saealign.selection as selection
    from saealign.evaluation import run_grid
    from saealign.scoring import STORY_TOPICS
    ref = ReferenceSet.from_summaries(torch.eye(sae.cfg.d_sae)[:40] + 0.01, torch.nn.functional.normalize(
        torch.randn(40, 384, generator=torch.Generator().manual_seed(0)), dim=1), prompts=[f"A story {i}." for i in range(40)])
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))  # nothing measured before, in memory or on disk
    measured, real = [], selection.activation_means
    monkeypatch.setattr(selection, "activation_means", lambda m, s, texts, **kw: measured.append(list(texts)) or real(m, s, texts, **kw))
    sae_id = sae.cfg.metadata.hook_name
    topics = {"sea": STORY_TOPICS["sea"][:3], "food": STORY_TOPICS["food"][:3]}
    rows = run_grid(tmp_path / "grid.jsonl", model=model, embedder=embedder, saes={sae_id: sae}, references={sae_id: ref},
                    topics=topics, prompts={"Once upon a time": "neutral"}, seeds=(0,), methods=("DiffMeans",),
                    outputs=("error",), max_new_tokens=4, progress=False)
    assert len(rows) == 2
    as_sets = lambda lists: sorted(tuple(sorted(t)) for t in lists)
    assert as_sets(measured) == as_sets([topics["sea"], topics["food"], ref.prompts])
    measured.clear()
    run_grid(tmp_path / "other.jsonl", model=model, embedder=embedder, saes={sae_id: sae}, references={sae_id: ref},
             topics={"sea": topics["sea"]}, prompts={"Once upon a time": "neutral"}, seeds=(0,), methods=("DiffMeans",),
             outputs=("error",), max_new_tokens=4, progress=False)
    assert as_sets(measured) == as_sets([topics["sea"]])


def test_topic_inputs_measured_computes_nothing(model, sae):
    ref = ReferenceSet.from_summaries(torch.eye(sae.cfg.d_sae)[:40] + 0.01, torch.nn.functional.normalize(
        torch.randn(40, 384, generator=torch.Generator().manual_seed(0)), dim=1), prompts=[f"A story {i}." for i in range(40)])
    scores = LatentScores(torch.linspace(1, 0, sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae),
                          torch.ones(sae.cfg.d_sae, dtype=torch.bool), "sea", [], {})
    inputs = TopicInputs(model, sae, ref, ["The boat sailed on the sea."], None, given_scores=scores, cache_dir=False)
    assert inputs.measured("scores") is scores and inputs.measured("output") is None and inputs.measured("means") is None
    assert "means" not in vars(inputs)  # asking computed nothing
    align, _ = inputs.means
    assert inputs.measured("means")[0] is align
    with pytest.raises(ValueError, match="piece must be"):
        inputs.measured("strengths")
