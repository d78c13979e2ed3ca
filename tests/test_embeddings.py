"""The default embedder, the embeddings and the weight digests every cache key stands on: their values are pinned, so
caches, the shipped reference and committed results written before a refactoring still read."""
import torch

from saealign.core import _model_description, _sae_description, json_sha256, sae_digest, tensor_digest
from saealign.embeddings import EmbeddingCache, embed_texts, embedder_key, load_embedder

# computed by saealign before the embeddings and digests left the reference module (main at de17301)
STORIES_WEIGHTS_SAMPLE = "3eb3659ccd7f53c260e2ead17f5c9807e0ebf2f846d03a8b618172e3809bd13e"
STORIES_WEIGHTS = "36d0e20fad713fb1f46b84a6a81c66095ff5ee23f9c1440f0e6964d77ae33735"
STORIES_SAE = "41e143bf423ab31dc8351493aac2945f67124f4bda5555df90a43b2d554160a7"
STORIES_DESCRIPTION = "cbc9912bae1b8bb8d211b595264f468766d99a826b2c08f0dd2e900b37c673da"
STORIES_SAE_DESCRIPTION = "0eb21ff39c06b7ad56696b01c1acf94a4256e3262330dceea5985daded75c659"
MINILM_KEY = "23adf91824ddfaa00e881f01dc9ee64b88716ed92fbbb7e81e7aa1a5b823827f"
MINILM_TEXTS_KEY = "5565d65eeabdf1dca9dc73426200921b3c7138d8adce4a29f6eb2f0cfcc331ba"  # ["Once upon a time", "The sea"]


def test_embedder_default_is_minilm():
    emb = load_embedder()
    vectors = emb.encode(["a medical doctor", "a physician", "a red shoe"], normalize_embeddings=True)
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_weight_digests_are_those_saealign_always_wrote(model, sae):
    assert tensor_digest(model, sample=4096) == STORIES_WEIGHTS_SAMPLE
    assert tensor_digest(model) == STORIES_WEIGHTS
    assert sae_digest(sae) == STORIES_SAE
    assert json_sha256(_model_description(model)) == STORIES_DESCRIPTION
    assert json_sha256(_sae_description(sae)) == STORIES_SAE_DESCRIPTION


def test_embedding_keys_are_those_saealign_always_wrote(embedder, tmp_path):
    assert embedder_key(embedder) == MINILM_KEY
    assert EmbeddingCache(tmp_path, embedder).key(["Once upon a time", "The sea"]) == MINILM_TEXTS_KEY


def test_tensor_digest_sees_changes(sae):
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    d0 = tensor_digest(state)
    state["b_enc"][3] += 1e-3
    assert tensor_digest(state) != d0
    assert tensor_digest(sae, sample=16) == tensor_digest(sae, sample=16)


def test_cached_embeddings_are_the_computed_ones(embedder, tmp_path):
    texts = ["A boat on the sea.", "A cake for tea."]
    cache = EmbeddingCache(tmp_path, embedder)
    (first, hit1), (again, hit2) = cache.embed(texts), cache.embed(texts)
    assert (hit1, hit2) == (False, True) and torch.equal(first, again) and torch.equal(first, embed_texts(embedder, texts))
    assert first.shape == (2, cache.dim) and torch.allclose(first.norm(dim=1), torch.ones(2), atol=1e-5)
