"""The shared pass on stories260K: padding ids and special tokens against the tokenizer, a batched pass against
one prompt at a time and against a full forward, the kept positions, and an SAE's latents there."""
from types import SimpleNamespace

import pytest
import torch

from saealign.activations import (check_no_saes, content_mask, encode_kept, hook_activations, latent_acts, pad_id,
                                  pad_right, special_ids, tokenize)

TEXTS = ["Once upon a time there was a cat", "Lily", "The sea was big and blue and the boat was small"]


def test_pad_id_and_special_ids_come_from_the_tokenizer(model):
    tok = model.tokenizer
    assert pad_id(model) == (tok.pad_token_id if tok.pad_token_id is not None else 0)
    assert special_ids(model) == sorted(set(tok.all_special_ids))
    assert set(special_ids(model, structural=True)) == {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                                                        if i is not None}
    no_pad = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=None))
    assert pad_id(no_pad) == 0 and special_ids(SimpleNamespace(tokenizer=None)) == [] and pad_id(SimpleNamespace()) == 0


def test_right_padding_known_answer():
    tokens, mask = pad_right([torch.tensor([1, 5, 6]), torch.tensor([1])], 9, "cpu")
    assert tokens.tolist() == [[1, 5, 6], [1, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_tokenize_cuts_and_counts(model):
    full, cut = tokenize(model, TEXTS)
    short, n_cut = tokenize(model, TEXTS, max_tokens=4)
    assert cut == 0 and [x.tolist() for x in short] == [x[:4].tolist() for x in full]
    assert n_cut == sum(len(x) > 4 for x in full) and all(x[0] == model.tokenizer.bos_token_id for x in full)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        tokenize(model, TEXTS, max_tokens=0)


def test_batched_activations_equal_one_prompt_at_a_time_and_a_full_forward(model, sae):
    hook = sae.cfg.metadata.hook_name
    ids, _ = tokenize(model, TEXTS)
    tokens, mask = pad_right(ids, pad_id(model), "cpu")
    batched = hook_activations(model, hook, tokens, mask)
    for i, x in enumerate(ids):
        alone = hook_activations(model, hook, x[None], torch.ones(1, len(x), dtype=torch.long))[0]
        _, cache = model.run_with_cache(x[None], names_filter=hook)
        # equal up to the float rounding of differently shaped matmuls (a few 1e-6 on some CPUs)
        torch.testing.assert_close(batched[i, :len(x)], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(alone, cache[hook][0], atol=1e-5, rtol=1e-4)


def test_content_mask_leaves_out_padding_and_special_tokens(model):
    bos = model.tokenizer.bos_token_id
    tokens = torch.tensor([[bos, 300, bos, 301], [bos, 302, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert content_mask(model, tokens, mask).tolist() == [[False, True, False, True], [False, True, False, False]]


def test_latents_at_the_kept_positions(model, sae):
    ids, _ = tokenize(model, TEXTS)
    tokens, mask = pad_right(ids, pad_id(model), "cpu")
    x, z, kept, pos = latent_acts(model, sae, tokens, mask, batch=2)
    keep = content_mask(model, tokens, mask)
    assert len(x) == len(z) == len(kept) == int(keep.sum()) == sum(len(i) - 1 for i in ids)  # every BOS left out
    assert torch.equal(tokens[pos[:, 0], pos[:, 1]], kept)
    torch.testing.assert_close(z, sae.encode(x), atol=1e-5, rtol=1e-4)
    act = hook_activations(model, sae.cfg.metadata.hook_name, tokens, mask)
    dense = encode_kept(sae, act, keep)
    assert (dense[~keep] == 0).all()
    torch.testing.assert_close(dense[keep], z, atol=1e-5, rtol=1e-4)


def test_a_model_with_an_sae_spliced_in_is_refused(model, sae):
    model.add_sae(sae)
    try:
        with pytest.raises(ValueError, match="reset_saes"):
            check_no_saes(model)
        with pytest.raises(ValueError, match="reset_saes"):
            latent_acts(model, sae, torch.tensor([[1, 300]]))
    finally:
        model.reset_saes()
