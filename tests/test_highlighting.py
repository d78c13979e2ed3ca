"""Highlighting on stories260K: calibration's known answers, steer attribution against a direct computation, a scheduled
steer's teacher-forced pass against cached decoding, the views without a method, and bad input."""
import math

import numpy as np
import pytest
import torch

from saealign.calibration import topic_steer
from saealign.highlighting import (CONTAMINATION_WINDOW, ContaminationScale, ReferenceTokens, auroc, contamination_scale,
                                   format_token_rows, highlight, reference_tokens, steer_attribution, token_pass,
                                   token_rows, window_mean)
from saealign.reference import build_reference_prompts, compute_reference
from saealign.scoring import STORY_TOPICS, score_latents
from saealign.additive import DiffMeans, TopicInputs
from saealign.output_scores import decoder_directions
from saealign import registry
from saealign.methods import Swap, Unchanged
from saealign.steering import generate, steer


@pytest.fixture(scope="module")
def ref(model, sae, embedder):
    return compute_reference(model, sae, build_reference_prompts(200, seed=3), embedder, max_tokens=48, progress=False)


@pytest.fixture(scope="module")
def scores(ref, embedder):
    return score_latents(ref, STORY_TOPICS["sea"], embedder)


@pytest.fixture(scope="module")
def tokens(model, sae, ref):
    return reference_tokens(model, sae, ref, n=64, max_tokens=48)


def test_reference_median_is_half_and_percentiles_follow_the_raw_share(sae, tokens, scores):
    cal = contamination_scale(sae, tokens, Unchanged(scores))
    assert len(cal.values) > 1000 and float(cal.percentile(cal.median)) == 0.5
    raw = torch.linspace(float(cal.values[0]), float(cal.values[-1]), 50)
    pct = cal.percentile(raw)
    assert (pct.diff() >= 0).all() and pct[0] < 0.01 and pct[-1] > 0.99


def test_window_mean_known_answers():
    torch.testing.assert_close(window_mean([0.0, 0.0, 3.0, 0.0, 0.0], 3), torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(window_mean([2.0, 4.0, 9.0], 5), torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64))  # ends: fewer
    torch.testing.assert_close(window_mean([1.0, math.nan, 3.0], 3), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert window_mean([math.nan, math.nan], 1).isnan().all() and len(window_mean([], 3)) == 0
    for bad in (2, 0, 1.5):
        with pytest.raises(ValueError):
            window_mean([1.0], bad)


def test_the_scale_averages_within_each_reference_prompt(sae, tokens, scores):
    per_token = contamination_scale(sae, tokens, Unchanged(scores), window=1)
    windowed = contamination_scale(sae, tokens, Unchanged(scores), window=3)
    assert per_token.window == 1 and windowed.window == 3 and len(per_token.values) == len(windowed.values)
    # independently: the shares prompt by prompt, each averaged with numpy over its own neighbours only
    with torch.no_grad():
        share = Unchanged(scores).contamination(sae.encode(tokens.x))[1].double().numpy()
    expected, start = [], 0
    for n in tokens.lengths.tolist():
        s = share[start:start + n]
        expected += [s[max(0, i - 1):i + 2].mean() for i in range(n)]
        start += n
    np.testing.assert_allclose(windowed.values.numpy(), np.sort(expected), atol=1e-6)
    np.testing.assert_allclose(per_token.values.numpy(), np.sort(share), atol=1e-6)
    with pytest.raises(ValueError, match="summing"):
        ReferenceTokens(tokens.x, tokens.lengths[:-1])


def test_calibration_under_a_method_sees_its_edit(sae, tokens, scores):
    plain = contamination_scale(sae, tokens, Unchanged(scores))
    swapped = contamination_scale(sae, tokens, Swap(scores))
    assert swapped.median < plain.median  # Swap keeps better-scored latents: lower contamination


def test_attribution_is_the_log_probability_difference(model, sae, scores):
    vector = (0.5 * decoder_directions(sae, scores.top(5))).sum(0)
    method = DiffMeans(scores, vector)
    g = generate(model, sae, "Once upon a time", method, max_new_tokens=12, seed=0)[0]
    details = highlight(model, sae, g, scores, method)
    steered, plain = token_pass(model, sae, g, method), token_pass(model, sae, g)
    direct = [float(steered.logprobs[j, t] - plain.logprobs[j, t]) for j, t in enumerate(g.tokens)]
    assert [d.attribution for d in details] == pytest.approx(direct, abs=1e-5)
    assert any(abs(a) > 0.05 for a in direct)
    assert all(d.moved and d.moved[0][0] == -1 for d in details)  # a vector method: the vector moved every token


@pytest.fixture(scope="module")
def sea_inputs(model, sae, ref, embedder, scores):
    return TopicInputs(model, sae, ref, STORY_TOPICS["sea"], embedder, given_scores=scores)


@pytest.fixture(scope="module")
def topic_steers(sea_inputs):
    "The sea topic's difference-of-means steer at strength 2: generation-only (the default), decaying, fixed."
    return {name: topic_steer(sea_inputs, strength=2.0, **options)
            for name, options in [("generation", dict(positions="generation")), ("decay", dict(half_life=4.0)), ("fixed", {})]}


def added_at_hook(sae, into: list) -> list:
    "Hooks that append, per forward pass, what steering added at the SAE's hook (error mode: its output − its input)."
    hook, seen = sae.cfg.metadata.hook_name, {}
    return [(f"{hook}.hook_sae_input", lambda x, hook: seen.update(x=x)),
            (f"{hook}.hook_sae_output", lambda out, hook: into.append((out - seen["x"])[0]))]


def teacher_forced_added(model, sae, method, g) -> tuple[torch.Tensor, int]:
    "What `method` adds at each position of the teacher-forced pass over `g`'s prompt and tokens, and the prompt's length."
    prompt = model.to_tokens(g.prompt)[0].tolist()
    added = []
    with torch.no_grad(), steer(model, sae, method, prompt_length=len(prompt)), model.hooks(fwd_hooks=added_at_hook(sae, added)):
        model(torch.tensor([prompt + g.tokens]))
    return added[0], len(prompt)


def cached_greedy(model, sae, method, text: str, n_new: int, hooks=()) -> tuple[list[int], torch.Tensor]:
    "KV-cached greedy decoding of `text` under `method`: the new ids, and the log-probabilities each pass gave them."
    logprobs, last = [], f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    keep = lambda resid, hook: logprobs.append(model.unembed(model.ln_final(resid))[0, -1].log_softmax(-1))
    with torch.no_grad(), steer(model, sae, method), model.hooks(fwd_hooks=list(hooks) + [(last, keep)]):
        out = model.generate(model.to_tokens(text), max_new_tokens=n_new, do_sample=False, stop_at_eos=False,
                             verbose=False)
    return out[0, -n_new:].tolist(), torch.stack(logprobs)


@pytest.mark.parametrize("name", ["generation", "decay"])
def test_a_scheduled_steer_is_teacher_forced_as_it_generated(model, sae, topic_steers, name):
    "Parity with KV-cached greedy decoding (what each pass added, read at the hook), and the schedule's known factors."
    method, prompt, n_new, cached = topic_steers[name], "Once upon a time", 12, []
    ids, logprobs = cached_greedy(model, sae, method, prompt, n_new, hooks=added_at_hook(sae, cached))
    g = generate(model, sae, prompt, method, max_new_tokens=n_new, do_sample=False)[0]
    assert g.tokens == ids
    forced, n = teacher_forced_added(model, sae, method, g)
    # BOS (position 0) aside: cached decoding steers it (sae_lens gets no tokens from generate), teacher forcing does not
    torch.testing.assert_close(forced[1:-1], torch.cat(cached)[1:], atol=1e-5, rtol=0)
    full = 2.0 * float(method.direction.norm())
    steps = torch.arange(len(forced) - n + 1, dtype=torch.float32)
    on_prompt, on_new = (0.0, torch.full_like(steps, full)) if name == "generation" else (full, full * 0.5 ** (steps / 4))
    norms = forced.norm(dim=-1)
    assert norms[1:n - 1].tolist() == pytest.approx([on_prompt] * (n - 2), abs=1e-4)
    assert norms[n - 1:].tolist() == pytest.approx(on_new.tolist(), abs=1e-4)
    # the attribution's pass steers BOS as cached decoding does: the same distributions at every generated token
    torch.testing.assert_close(token_pass(model, sae, g, method).logprobs, logprobs, atol=1e-4, rtol=0)


def test_a_generation_only_steer_is_attributed(model, sae, sea_inputs):
    "Where the steer changed the text, its tokens' attribution is not ×1 everywhere; the prompt's positions get nothing."
    # greedy and strong enough to change the text by a wide margin: a sampled run at strength 2 keeps the unsteered
    # text on some CPUs and seeds
    method = topic_steer(sea_inputs, strength=4.0, positions="generation")
    g = generate(model, sae, "Once upon a time", method, max_new_tokens=16, do_sample=False)[0]
    plain = generate(model, None, "Once upon a time", max_new_tokens=16, do_sample=False)[0]
    assert sum(a != b for a, b in zip(g.tokens, plain.tokens)) >= 8
    attribution = steer_attribution(token_pass(model, sae, g, method).logprobs, token_pass(model, sae, g).logprobs, g.tokens)
    assert attribution.abs().max() > 0.5
    forced, n = teacher_forced_added(model, sae, method, g)
    assert (forced[:n - 1].norm(dim=-1) < 1e-5).all() and (forced[n - 1:].norm(dim=-1) > 1).all()


def test_the_attribution_pass_replays_cached_decoding_for_a_fixed_steer(model, sae, topic_steers):
    "A steer at every position reaches BOS while generating (sae_lens sees no token ids there); the replay does too."
    method, prompt, n_new = topic_steers["fixed"], "Once upon a time", 12
    ids, logprobs = cached_greedy(model, sae, method, prompt, n_new)
    g = generate(model, sae, prompt, method, max_new_tokens=n_new, do_sample=False)[0]
    assert g.tokens == ids
    torch.testing.assert_close(token_pass(model, sae, g, method).logprobs, logprobs, atol=1e-4, rtol=0)


def test_a_prompted_steer_is_replayed_behind_its_prefix(model, sae, sea_inputs):
    "Prompting and steering combined: the attribution pass runs behind the same prefix the generation ran behind."
    method, prompt, n_new = topic_steer(sea_inputs, strength=2.0, prompted=True), "Once upon a time", 10
    assert method.prefix
    ids, logprobs = cached_greedy(model, sae, method, method.prefix + prompt, n_new)
    g = generate(model, sae, prompt, method, max_new_tokens=n_new, do_sample=False, prefix=method.prefix)[0]
    assert g.prompt == prompt and g.tokens == ids
    torch.testing.assert_close(token_pass(model, sae, g, method).logprobs, logprobs, atol=1e-4, rtol=0)


def test_a_fixed_steer_is_attributed_as_before(model, sae, topic_steers, scores):
    "One vector at every position: the pass is what it was without prompt_length, and what DiffMeans with it gives."
    method = topic_steers["fixed"]
    g = generate(model, sae, "Once upon a time", method, max_new_tokens=16, seed=0)[0]
    prompt = model.to_tokens(g.prompt)[0].tolist()
    with torch.no_grad(), steer(model, sae, method, exclude_special_tokens=False):
        before = model(torch.tensor([prompt + g.tokens]))[0, len(prompt) - 1:-1].log_softmax(-1)
    plain = token_pass(model, sae, g).logprobs
    for m in (method, DiffMeans(scores, method.residual_delta(sae))):
        torch.testing.assert_close(token_pass(model, sae, g, m).logprobs, before, atol=1e-6, rtol=0)
        torch.testing.assert_close(steer_attribution(token_pass(model, sae, g, m).logprobs, plain, g.tokens),
                                   steer_attribution(before, plain, g.tokens), atol=1e-6, rtol=0)


def test_without_a_method_there_is_nothing_to_attribute(model, sae, scores, tokens):
    g = generate(model, None, "Once upon a time", max_new_tokens=8, seed=0)[0]
    scale = contamination_scale(sae, tokens, Unchanged(scores))
    details = highlight(model, sae, g, scores, None, scale=scale)
    assert all(math.isnan(d.attribution) and not d.moved and 0 <= d.calibrated <= 1 for d in details)
    # the colour: each token's raw share averaged with its neighbours, placed among the reference's averages
    placed = scale.percentile(window_mean([d.contamination for d in details], CONTAMINATION_WINDOW))
    torch.testing.assert_close(torch.tensor([d.calibrated for d in details]), placed, check_dtype=False)
    text = format_token_rows(details)
    assert "–" in text and len(token_rows(details)) == len(g.tokens)


def test_bad_input_is_refused(model, sae, scores, tokens):
    with pytest.raises(ValueError, match="sorted"):
        ContaminationScale(torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="must be a Method"):
        contamination_scale(sae, tokens, scores)
    with pytest.raises(ValueError, match="n tokens"):
        steer_attribution(torch.zeros(3, 5), torch.zeros(3, 5), [1, 2])
    with pytest.raises(ValueError, match="both groups"):
        auroc([], [1.0])
    empty = generate(model, None, "Once upon a time", max_new_tokens=1, seed=0)[0]
    empty.tokens, empty.pieces = [], []
    with pytest.raises(ValueError, match="no tokens"):
        token_pass(model, sae, empty)


def test_attribution_costs_one_pass_more_than_the_details(model, sae, scores):
    "Forward passes counted at the embedding: highlight runs twice what token_details runs (its one pass), or the same without a method."
    from saealign.render import token_details
    g = generate(model, sae, "Once upon a time", Swap(scores), max_new_tokens=8, seed=0)[0]

    def passes(fn):
        seen = []
        with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: seen.append(1))]):
            fn()
        return len(seen)

    one = passes(lambda: token_details(model, sae, g, scores, Swap(scores)))
    assert one >= 1
    assert passes(lambda: highlight(model, sae, g, scores, Swap(scores))) == 2 * one
    assert passes(lambda: highlight(model, sae, g, scores, None)) == one


def test_separation_pairs_sentences_and_measures_every_mode(model, sae, ref, embedder, tokens, monkeypatch):
    "Each token of each paragraph is labelled once; AUROCs lie in [0, 1]; the default method is the calibration chapter's."
    from saealign.calibration import DEFAULT_METHOD
    from saealign.highlighting import MODE_FIELDS, heldout_paragraphs, separation
    topics = {k: {"align": v[:5], "heldout": v[5:]} for k, v in STORY_TOPICS.items()}
    result = separation(model, sae, ref, embedder, topics, method="DiffMeans", n=2, names=["sea"], tokens=tokens,
                        progress=False)
    paragraphs = [p for p in heldout_paragraphs({k: t["heldout"] for k, t in topics.items()}, 2) if p["topic"] == "sea"]
    assert len(paragraphs) == 2 and {v["paragraph"] for v in result["values"]} == {p["text"] for p in paragraphs}
    table = result["table"]
    assert table["sea"]["tokens"] == table["pooled"]["tokens"] == len(result["values"])
    assert all(0 <= table["sea"][m] <= 1 for m in MODE_FIELDS)
    assert {v["on"] for v in result["values"]} == {True, False}
    with pytest.raises(ValueError, match="names must be some of the topics"):
        separation(model, sae, ref, embedder, topics, names=["ocean"], tokens=tokens, progress=False)

    def building(name, inputs, **options):
        raise LookupError(name)
    monkeypatch.setattr(registry, "make_method", building)
    with pytest.raises(LookupError, match=DEFAULT_METHOD):
        separation(model, sae, ref, embedder, topics, names=["sea"], tokens=tokens, progress=False)


@pytest.mark.parametrize("name", ["generation", "decay"])
def test_a_scheduled_steer_shows_its_vector_on_hover(model, sae, topic_steers, scores, name):
    "The hover lists the vector a schedule added (latent -1) at every generated token, in proportion to its factor."
    method = topic_steers[name]
    g = generate(model, sae, "Once upon a time", method, max_new_tokens=8, do_sample=False)[0]
    moved = token_pass(model, sae, g, method)
    full = 2.0 * float(method.direction.norm())
    factors = torch.ones(8) if name == "generation" else 0.5 ** (torch.arange(8.0) / 4)
    torch.testing.assert_close(moved.added.norm(dim=-1), full * factors, atol=1e-4, rtol=1e-5)
    assert all(any(entry[0] == -1 for entry in d.moved) for d in highlight(model, sae, g, scores, method))
