"""Exported steers on the real model, Gemma 3 270M (the session's `gemma` fixture): the transformers hook against
saealign's own steering, and llama.cpp (an optional extra) against saealign's greedy continuation."""
import importlib.util

import pytest
import torch

from saealign.export import LLAMACPP_INSTALL, apply, export_vector, llamacpp_greedy, llamacpp_model, load_vector, write_gguf
from saealign.models import GENERAL_PROMPTS, gemma_folder, gguf_package
from saealign.saes import load_sae
from saealign.scoring import topic_texts
from saealign.selection import AddSteer, DiffMeans, activation_means
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


@torch.no_grad()
def test_llamacpp_continues_as_saealign_does(gemma, tmp_path):
    """llama.cpp on the Q4_K_M GGUF with the exported control vector continues greedily as saealign does on its
    float32 dequantisation of the same weights (the vector at every position in both) for 16 tokens or more."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(f"llama.cpp is not installed: {LLAMACPP_INSTALL}")
    sae = load_sae(model=gemma)
    medical = DiffMeans.from_means(torch.ones(sae.cfg.d_sae), activation_means(gemma, sae, topic_texts("medical")),
                                   activation_means(gemma, sae, list(GENERAL_PROMPTS)))
    path = write_gguf(export_vector(medical, sae, gemma), tmp_path / "medical.gguf")
    llm = llamacpp_model(gguf_package().assemble(tmp_path / "gemma.gguf"), load_vector(path), n_ctx=128)
    plain_llm = llamacpp_model(tmp_path / "gemma.gguf", n_ctx=128)
    for prompt in PROMPTS:
        ids = gemma.to_tokens(prompt)
        with steer(gemma, sae, medical, exclude_special_tokens=False):
            ours = gemma.generate(ids, max_new_tokens=16, do_sample=False, verbose=False, stop_at_eos=False)
        ours = ours[0, ids.shape[1]:].tolist()
        assert llamacpp_greedy(llm, ids[0].tolist(), 16) == ours, prompt
        assert llamacpp_greedy(plain_llm, ids[0].tolist(), 16) != ours, prompt  # the vector is what makes them agree
