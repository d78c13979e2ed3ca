"""Exported steers on the real model, Gemma 3 270M (the session's `gemma` fixture): the transformers hook against
saealign's own steering, and llama.cpp (an optional extra) against saealign's greedy continuation."""
import importlib.util

import pytest
import torch

from saealign.export import (LLAMACPP_INSTALL, apply, export_vector, llamacpp_greedy, llamacpp_logits, llamacpp_model,
                             llamacpp_parity, LlamaCppParity, load_vector, write_gguf)
from saealign.models import GENERAL_PROMPTS, gemma_folder, gguf_package
from saealign.saes import load_sae
from saealign.scoring import topic_texts
from saealign.additive import AddSteer, DiffMeans, activation_means
from saealign.steering import steer

PROMPTS = ["The patient was diagnosed with", "Once upon a time, in a small village far away,"]


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def test_transformers_hook_matches_saealign_on_gemma(gemma):
    """The hook's steered logits equal saealign's transformer_lens steered logits within 1e-4 (relative to the
    largest logit) at every position, for both position policies, while the steer itself moves them far more."""
    from transformers import AutoModelForCausalLM
    sae = load_sae(model=gemma)
    method = AddSteer(torch.ones(sae.cfg.d_sae), [11, 250, 1031, 2048, 4000], [60.0, 40.0, 80.0, 50.0, 70.0])
    sv = export_vector(method, sae, gemma)
    hf = AutoModelForCausalLM.from_pretrained(gemma_folder(), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        tokens = gemma.to_tokens(prompt)
        plain = hf(tokens).logits
        for positions, exclude in (("all", False), ("non-special", True)):
            with steer(gemma, sae, method, exclude_special_tokens=exclude):
                ours = gemma(tokens)
            with apply(sv, hf, positions=positions):
                theirs = hf(tokens).logits
            assert relative(theirs, ours) <= 1e-4, (prompt, positions, relative(theirs, ours))
            assert relative(theirs, plain) > 1e-2, (prompt, positions)


def test_parting_counts_as_a_near_tie_only_inside_the_engines_rounding():
    effect = torch.ones(3)
    assert LlamaCppParity([1, 2], [1, 2], 2, effect, None, None).parts_on_near_tie  # never parted
    assert LlamaCppParity([1, 2], [1, 3], 1, effect, 0.1, 0.5).parts_on_near_tie
    assert not LlamaCppParity([1, 2], [1, 3], 1, effect, 0.9, 0.5).parts_on_near_tie


@torch.no_grad()
def test_llamacpp_steers_as_saealign_does(gemma, tmp_path):
    """llama.cpp on the Q4_K_M GGUF with the exported control vector against saealign on its float32 dequantisation
    of the same weights (the vector at every position in both). The engines differ unsteered (llama.cpp rounds
    activations to 8 bits in its matrix products), so: the steer changes the logits the same way in both
    (teacher-forced on saealign's text); the greedy continuations part only on a near-tie, two tokens closer in
    saealign's logits than the unsteered engines are to each other there; on the demo's prompt they agree for 16
    tokens; and without the vector llama.cpp does not follow saealign's steered text."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(f"llama.cpp is not installed: {LLAMACPP_INSTALL}")
    sae = load_sae(model=gemma)
    medical = DiffMeans.from_means(torch.ones(sae.cfg.d_sae), activation_means(gemma, sae, topic_texts("medical")),
                                   activation_means(gemma, sae, list(GENERAL_PROMPTS)))
    path = write_gguf(export_vector(medical, sae, gemma), tmp_path / "medical.gguf")
    weights = gguf_package().assemble(tmp_path / "gemma.gguf")
    llm = llamacpp_model(weights, load_vector(path), n_ctx=128, logits_all=True)
    plain_llm = llamacpp_model(weights, n_ctx=128, logits_all=True)
    agreed = {}
    for prompt in PROMPTS:
        ids = gemma.to_tokens(prompt)[0].tolist()
        parity = llamacpp_parity(gemma, sae, medical, llm, plain_llm, ids, 16)
        assert parity.effect.median() > 0.95 and parity.parts_on_near_tie, (prompt, parity)
        agreed[prompt] = parity.agreed
        assert llamacpp_greedy(plain_llm, ids, 16) != parity.ours, prompt  # the vector is what makes them follow
    assert agreed[PROMPTS[0]] == 16, agreed
    with pytest.raises(ValueError, match=r"logits_all=True"):
        llamacpp_logits(llamacpp_model(weights, n_ctx=32), ids)
