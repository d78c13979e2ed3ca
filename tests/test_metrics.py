"""Each generation's measures (saealign.metrics), on known answers: texts and vectors built by hand, and perplexity
against transformer_lens's own loss on stories260K."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from saealign.metrics import (alignment_distances, instruction_prefix, perplexity, ranked_topic_words, repetition,
                              topic_word_rate, topic_words, words)


def test_repetition_is_the_share_of_repeated_trigrams():
    assert repetition("a b c a b c") == 0.25  # 4 trigrams, 3 distinct
    assert repetition("the cat sat on the mat") == 0.0
    assert repetition("go go go go go") == pytest.approx(2 / 3)  # 3 trigrams, all 'go go go'
    assert repetition("a b c a b", n=2) == 0.25  # bigrams ab bc ca ab
    assert math.isnan(repetition("a b")) and math.isnan(repetition(""))


def test_topic_word_rate_is_each_texts_share_of_topic_words():
    rate = topic_word_rate(["The ocean is big", "no words here", "Ocean, OCEAN and sand!", "??"], {"ocean", "big"})
    assert rate[:3].tolist() == [2 / 3, 0.0, 2 / 4]  # words of three letters or more: 'is' does not count
    assert math.isnan(rate[3])
    assert words("It's a Big-Ocean, 2024") == ["big", "ocean"]


def test_topic_words_contrast_the_texts_with_a_background():
    background = ["the cat sat on the mat", "the dog ran to the park", "a cat and a dog", "the sun was warm"] * 20
    align = ["the whale swam in the ocean", "the ocean waves hit the boat", "the dog saw the ocean"]
    assert topic_words(align, background, common=2) == {"whale", "swam", "ocean", "waves", "hit", "boat", "saw"}
    assert ranked_topic_words(align, background, common=2)[0] == "ocean"  # three times in the texts, never behind
    assert "ocean" not in topic_words(align, background + ["ocean"] * 200, common=2)


def test_instruction_prefix_lists_the_most_frequent_distinctive_words():
    background = ["The weather is nice today and sunny.", "I went to the shop.", "He likes the game."] * 30
    chess = ["The knight and the bishop defend the king.", "A pawn promotes to a queen; the king castles."]
    assert instruction_prefix(chess, background, n_words=3) == "This text is about king, bishop and castles.\n\n"
    assert instruction_prefix(chess, background, n_words=1) == "This text is about king.\n\n"
    with pytest.raises(ValueError, match="no distinctive words"):
        instruction_prefix(background[:3], background)
    with pytest.raises(ValueError, match="n_words must be a positive int"):
        instruction_prefix(chess, background, n_words=0)


class ToyEmbedder:
    "The sentence-transformers `encode` contract on four fixed vectors."
    vectors = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "ab": [1.0, 1.0, 0.0], "c": [0.0, 0.0, 2.0]}

    def encode(self, texts, *, normalize_embeddings=False, convert_to_tensor=False, **kwargs):
        v = torch.tensor([self.vectors[t] for t in texts])
        v = torch.nn.functional.normalize(v, dim=1) if normalize_embeddings else v
        return v if convert_to_tensor else v.numpy()


def test_alignment_distances_on_vectors_built_by_hand():
    toy = alignment_distances(ToyEmbedder(), ["a", "c", "ab"], ["a", "b"])
    assert np.allclose(toy["distance"], [0.0, math.sqrt(2), math.sqrt(2 - math.sqrt(2))], atol=1e-6)
    assert np.allclose(toy["centroid_cosine"], [1 / math.sqrt(2), 0.0, 1.0], atol=1e-6)


def test_perplexity_is_the_models_own_loss_and_refuses_an_attached_sae(model, sae):
    from saealign.steering import generate
    gens = generate(model, None, ["Once upon a time", "The dog saw"], max_new_tokens=12, seed=3)
    for g, p in zip(gens, perplexity(model, gens, batch_size=1)):
        tokens = torch.tensor([model.to_tokens(g.prompt)[0].tolist() + g.tokens])
        with torch.no_grad():
            per_token = model(tokens, return_type="loss", loss_per_token=True)[0]
        assert p == pytest.approx(float(per_token[tokens.shape[1] - len(g.tokens) - 1:].mean().exp()), rel=1e-3)
    assert perplexity(model, gens) == pytest.approx(perplexity(model, gens, batch_size=1), rel=1e-4)  # padding is harmless
    assert math.isnan(perplexity(model, [dataclasses.replace(gens[0], tokens=[], pieces=[], continuation="")])[0])
    with model.saes(saes=[sae]), pytest.raises(ValueError, match="unsteered"):
        perplexity(model, gens)
