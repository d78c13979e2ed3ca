"""saealign.methods, additive and registry: known answers on hand-built cases, invariants of the methods, parity
with the model, and the registry's names and settings."""
import math

import pytest
import torch

from saealign.additive import (ActivationMeans, AddSteer, DiffMeans, TopicInputs, activation_means,
                               matched_strengths, mean_difference_strengths)
from saealign.methods import (CLAMP_VALUE, PAPER_CLAMP, Clamp, Method, OutputClamp, OutputSwap, Swap, Unchanged,
                              Unsteered, prompt_prefix)
from saealign.output_scores import OutputScores, decoder_directions, output_latents
from saealign.reference import ReferenceSet
from saealign.saes import random_sae
from saealign.registry import make_method, method_names, method_needs_sae, method_settings
from saealign.scoring import LatentScores
from saealign.steering import generate, steer


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
    prompting = Unsteered("Prompting", prefix=prefix)
    got = prompting.generate(model, None, ["Once upon a time", "The dog saw"], max_new_tokens=10, seed=3)
    want = generate(model, None, [prefix + "Once upon a time", prefix + "The dog saw"], max_new_tokens=10, seed=3)
    assert [g.prompt for g in got] == ["Once upon a time", "The dog saw"] and got[0].method == "Prompting"
    assert [(g.tokens, g.continuation) for g in got] == [(g.tokens, g.continuation) for g in want]
    assert not prompting.needs_sae and not prompting.topic_independent and Unsteered().topic_independent
    with pytest.raises(ValueError, match="either align_texts or a topic"):
        prompt_prefix(["a"], topic="b")
    with pytest.raises(ValueError, match="prefix must be a string"):
        Unsteered("Prompting", prefix=None)
    with pytest.raises(TypeError, match="runs without an SAE"):
        prompting.edit(None, torch.ones(2), torch.ones(2))


def test_every_registered_method_from_topic_inputs(model, sae):
    ref = ReferenceSet.from_summaries(torch.eye(sae.cfg.d_sae)[:40] + 0.01, torch.nn.functional.normalize(
        torch.randn(40, 384, generator=torch.Generator().manual_seed(0)), dim=1), prompts=[f"A story {i}." for i in range(40)])
    scores = LatentScores(torch.linspace(1, 0, sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae),
                          torch.ones(sae.cfg.d_sae, dtype=torch.bool), "sea", [], {})
    out = fake_output(sae.cfg.d_sae, list(range(10)), [1.0, 2.0, 0.5, 3.0, -1.0, 0.0, 4.0, 0.2, 0.1, 5.0])
    texts = ["The boat sailed on the big blue sea.", "Fish swam in the cold salty water."]
    inputs = TopicInputs(model, sae, ref, texts, None, given_scores=scores, given_output=out)
    # the calibration chapter's steers calibrate with the CoLA classifier: tested there (03d); FT fine-tunes (below)
    methods = {name: make_method(name, inputs) for name in method_names() if not name.startswith("TopicSteer") and name != "FT"}
    assert {"Original", "Prompting", "PromptingWords", "Swap", "Clamp", "Weight", "SAE", "OutputSwap", "OutputClamp",
            "AddSteer", "MatchedSteer", "DiffMeans"} <= set(methods)
    assert all(type(m).__name__ == name for name, m in methods.items() if m.needs_sae and name != "SAE")
    assert all(m.needs_sae == method_needs_sae(name) and m.name == name for name, m in methods.items())
    assert sorted(methods["AddSteer"].latents.tolist()) == sorted(output_latents(out).tolist())
    align, refm = activation_means(model, sae, texts), activation_means(model, sae, ref.prompts)
    torch.testing.assert_close(methods["DiffMeans"].vector, align.resid - refm.resid, atol=1e-6, rtol=0)
    matched = methods["MatchedSteer"]
    assert isinstance(matched, AddSteer) and matched.latents.tolist() == methods["AddSteer"].latents.tolist()
    added = (matched.strengths[:, None] * decoder_directions(sae, matched.latents)).sum(0)
    torch.testing.assert_close(added.norm(), methods["DiffMeans"].vector.norm(), rtol=1e-4, atol=0)
    assert make_method("Clamp", inputs, top_n=2).latents.tolist() == [0, 1]
    for m in methods.values():  # each through its own generate: the baselines without the SAE
        assert len(m.generate(model, sae, "Once upon a time", max_new_tokens=4)[0].tokens) == 4
    plain = generate(model, None, "Once upon a time", max_new_tokens=4, seed=2)[0].tokens
    assert methods["Original"].generate(model, sae, "Once upon a time", max_new_tokens=4, seed=2)[0].tokens == plain
    with pytest.raises(ValueError, match="unknown steering method 'Steer'"):
        make_method("Steer", inputs)
    with pytest.raises(ValueError, match="DiffMeans is built from a TopicInputs"):
        make_method("DiffMeans", scores)
    with pytest.raises(ValueError, match="multiplier"):
        TopicInputs(model, sae, ref, texts, None, multiplier=float("nan"))


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


def test_contamination_known_answer():
    acts = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    raw, share = Unchanged(torch.tensor([1.0, 0.0, 0.5])).contamination(acts)
    assert raw.tolist() == [1.5, 0.0] and share[0] == pytest.approx(1.5 / 4) and torch.isnan(share[1])


def test_clamp_known_answer_ties_broken_by_index(sae):
    scores = torch.zeros(sae.cfg.d_sae)
    scores[[3, 1, 7]] = torch.tensor([0.9, 0.9, 0.5])
    clamp = Clamp(scores, top_n=2, value=10.0)
    assert clamp.latents.tolist() == [1, 3]
    acts = torch.rand(2, sae.cfg.d_sae)
    edited = clamp.edit(sae, acts, acts)
    assert torch.equal(edited[:, [1, 3]], acts[:, [1, 3]] * 10) and torch.equal(edited[:, 4:], acts[:, 4:])
    added = Clamp(scores, top_n=1, value=2.0, mode="add").edit(sae, acts, acts)
    assert torch.equal(added[:, 1], acts[:, 1] + 2) and torch.equal(added[:, 2:], acts[:, 2:])
    with pytest.raises(ValueError, match="Clamp value must be a finite number"):
        Clamp(scores, value=float("nan"))


def test_the_registry_builds_by_name_and_refuses_unknown_names(sae):
    scores = torch.rand(sae.cfg.d_sae)
    assert {"SAE", "Clamp", "Swap", "Weight"} <= set(method_names())
    clamp = make_method("Clamp", scores, top_n=3)
    assert isinstance(clamp, Clamp) and len(clamp.latents) == 3 and isinstance(make_method("Swap", scores), Method)
    with pytest.raises(ValueError, match="unknown steering method 'Swapp'"):
        make_method("Swapp", scores)


def test_clamp_default_is_half_the_papers():
    "The grid keys its Clamp rows on PAPER_CLAMP (×10); Clamp's own default is ×5: both values stay as they were."
    assert PAPER_CLAMP == {"value": 10.0, "mode": "multiply"} and CLAMP_VALUE == 5.0
    assert Clamp(torch.rand(8)).value == 5.0


def test_registry_settings_per_method():
    "The fixed rules each method is registered with; a grid keys its units on them, so they stay byte for byte."
    from saealign.calibration import CALIBRATION_RULES, PROTECTIONS
    from saealign.core import json_sha256
    from saealign.learned import LEARNED_METHODS
    plain = ("Original", "FT", "Prompting", "PromptingWords", "SAE", "Clamp", "Swap", "Weight")
    assert {n: method_settings(n) for n in plain} == dict.fromkeys(plain, {})  # a grid keys them on its own options
    assert method_settings("DiffMeans") == {"multiplier": 1.0}
    assert method_settings("AddSteer") == {"multiplier": 1.0, "amplify": 0.25}
    assert method_settings("OutputSwap") == method_settings("OutputClamp") == {"amplify": 0.25}
    assert method_settings("MatchedSteer") == {"multiplier": 1.0, "amplify": 0.25, "strength": "the difference of means' norm"}
    # the digest a grid unit's key takes of them (the grid's former SELECTION_SETTINGS, in its key order)
    assert json_sha256(method_settings("MatchedSteer")) == json_sha256(
        {"multiplier": 1.0, "amplify": 0.25, "strength": "the difference of means' norm"})
    for name, options in PROTECTIONS.items():
        assert method_settings(name) == {**options, "calibration": CALIBRATION_RULES}
    for name in LEARNED_METHODS:
        assert method_settings(name)["positions"] == "generation" and "learning" in method_settings(name)


def test_method_names_after_importing_the_registry_alone():
    """A fresh interpreter that imports only the registry lists every method, the baselines, the TopicSteer family
    and the learned steers included; which of them need no SAE is known before any is built."""
    import subprocess
    import sys
    code = ("import saealign.registry as r; print(','.join(r.method_names())); "
            "print(','.join(n for n in r.method_names() if not r.method_needs_sae(n)))")
    names, sae_free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()
    assert names.split(",") == [
        "Original", "FT", "Prompting", "PromptingWords", "SAE", "Clamp", "Swap", "Weight", "OutputSwap", "OutputClamp",
        "AddSteer", "MatchedSteer", "DiffMeans", "TopicSteer", "TopicSteer-decay", "TopicSteer-generation",
        "TopicSteer-lift", "TopicSteer-prompted", "TopicSteer-instructed", "TopicSteer-learned",
        "TopicSteer-learned-instructed", "TopicSteer-preferred", "TopicSteer-preferred-instructed"]
    assert sae_free.split(",") == ["Original", "FT", "Prompting", "PromptingWords"]


def test_the_one_constructor_builds_every_registered_method(model, sae, embedder, tmp_path):
    "`align.method_from_texts` builds every registered method, the default included, on stories260K."
    import numpy as np
    from saealign.align import method_from_texts
    from saealign.calibration import DEFAULT_METHOD
    from saealign.reference import compute_reference, default_reference_prompts
    ref = compute_reference(model, sae, default_reference_prompts(model, 64), embedder, max_tokens=32, progress=False,
                            cache_dir=tmp_path)
    texts = ["The boat sailed on the big blue sea.", "Fish swam in the cold salty water.", "The sea was blue and wide."]
    fluency = lambda texts: np.full(len(texts), 0.9)
    small = {"calibration": {"prompts": ["Once upon a time", "One day"], "strengths": (1.0,), "max_new_tokens": 4,
                             "cache_dir": False}, "acceptability": fluency}
    options = {name: {} for name in method_names()}
    options |= {name: {"strength": 1.0} for name in method_names() if name.startswith("TopicSteer")}
    options |= {name: {"strength": 1.0, "learning": {"steps": 1, "cache_dir": False}, **small}
                for name in method_names() if "learned" in name or "preferred" in name}
    options["FT"] = {"epochs": 1}
    assert DEFAULT_METHOD in options
    for name, opts in options.items():
        method = method_from_texts(texts, name, model=model, sae=sae, embedder=embedder, reference=ref,
                                   n_latents=20, cache_dir=False, **opts)
        assert isinstance(method, Method) and method.name == name, name
