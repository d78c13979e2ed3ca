"""Highlighting on stories260K: calibration's known answers, steer attribution against a direct computation, the
views without a method, and bad input."""
import math

import pytest
import torch

from saealign.highlighting import (Calibration, auroc, calibrate, format_token_rows, highlight, reference_tokens,
                                   steer_attribution, token_pass, token_rows)
from saealign.reference import build_reference_prompts, compute_reference
from saealign.scoring import STORY_TOPICS, score_latents
from saealign.selection import DiffMeans, decoder_directions
from saealign.steering import Swap, Unchanged, generate


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
    cal = calibrate(sae, tokens, Unchanged(scores))
    assert len(cal.values) > 1000 and float(cal.percentile(cal.median)) == 0.5
    raw = torch.linspace(float(cal.values[0]), float(cal.values[-1]), 50)
    pct = cal.percentile(raw)
    assert (pct.diff() >= 0).all() and pct[0] < 0.01 and pct[-1] > 0.99


def test_calibration_under_a_method_sees_its_edit(sae, tokens, scores):
    plain = calibrate(sae, tokens, Unchanged(scores))
    swapped = calibrate(sae, tokens, Swap(scores))
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


def test_without_a_method_there_is_nothing_to_attribute(model, sae, scores, tokens):
    g = generate(model, None, "Once upon a time", max_new_tokens=8, seed=0)[0]
    details = highlight(model, sae, g, scores, None, calibration=calibrate(sae, tokens, Unchanged(scores)))
    assert all(math.isnan(d.attribution) and not d.moved and 0 <= d.calibrated <= 1 for d in details)
    text = format_token_rows(details)
    assert "–" in text and len(token_rows(details)) == len(g.tokens)


def test_bad_input_is_refused(model, sae, scores, tokens):
    with pytest.raises(ValueError, match="sorted"):
        Calibration(torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="must be a Method"):
        calibrate(sae, tokens, scores)
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
