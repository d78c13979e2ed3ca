"""saealign.output_scores: decoder directions, distinctive tokens and the output score, on known answers."""
import pytest
import torch

from saealign.output_scores import _next_token_logprobs, decoder_directions, distinctive_tokens, output_scores
from saealign.saes import random_sae


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
