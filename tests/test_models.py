import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED, needs_mirror
from saealign.models import gpt2_tokenizer, load_model, read_llama2c_checkpoint
from saealign.saes import check_sae_fits, load_sae

pytestmark = needs_mirror
CKPT = SHARED / "models/stories260K/stories260K.bin"


def rmsnorm(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def llama2c_forward(h, w, tokens):
    "llama2.c's forward pass in float64 numpy, written from run.c: adjacent-pair rotary, GQA, SwiGLU."
    W = {k: v.numpy().astype(np.float64) for k, v in w.items()}
    T, dim, nh, nkv = len(tokens), h["dim"], h["n_heads"], h["n_kv_heads"]
    hd = dim // nh
    x = W["tok"][tokens]
    angle = np.arange(T)[:, None] / 10000 ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

    def rope(v):
        even, odd = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(h["n_layers"]):
        xn = rmsnorm(x, W["rms_att"][l])
        q = rope((xn @ W["wq"][l].T).reshape(T, nh, hd))
        k = np.repeat(rope((xn @ W["wk"][l].T).reshape(T, nkv, hd)), nh // nkv, axis=1)
        v = np.repeat((xn @ W["wv"][l].T).reshape(T, nkv, hd), nh // nkv, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(T, dim) @ W["wo"][l].T
        xn = rmsnorm(x, W["rms_ffn"][l])
        gate = xn @ W["w1"][l].T
        x = x + (gate / (1 + np.exp(-gate)) * (xn @ W["w3"][l].T)) @ W["w2"][l].T
    return rmsnorm(x, W["rms_final"]) @ W["tok"].T


@pytest.mark.parametrize("text", ["Once upon a time", "The cat sat on the mat and looked at the big red ball.",
                                  "Tom and Lily went to the park. They played with a dog!"])
def test_stories_logits_match_independent_forward(stories, text):
    header, weights = read_llama2c_checkpoint(CKPT)
    tokens = stories.to_tokens(text)
    with torch.no_grad():
        ours = stories(tokens)[0].double().numpy()
    ref = llama2c_forward(header, weights, tokens[0].numpy())
    assert np.abs(ours - ref).max() < 1e-4


def test_stories_greedy_story(stories):
    out = stories.generate("Once upon a time", max_new_tokens=14, do_sample=False, verbose=False)
    assert out.startswith("Once upon a time, there was a little girl named Lily.")


def test_stories_mean_nll_is_low(stories):
    # the mirror README: about 0.18 nats/token on the model's own greedy story
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big, red ball.")
    loss = stories(stories.to_tokens(text), return_type="loss").item()
    assert loss < 0.4


@pytest.mark.parametrize("cut", [0, 20, 1000, -4])
def test_truncated_checkpoint(tmp_path, cut):
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes(CKPT.read_bytes()[:cut])
    with pytest.raises(ValueError, match="download it again"):
        read_llama2c_checkpoint(bad)


def test_truncated_checkpoint_through_load_model(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED / "models", mirror / "models")
    (mirror / "models/stories260K/stories260K.bin").chmod(0o644)
    (mirror / "models/stories260K/stories260K.bin").write_bytes(CKPT.read_bytes()[:-100])
    monkeypatch.setenv("SAEALIGN_ASSETS", str(mirror))
    with pytest.raises(ValueError, match="truncated"):
        load_model("stories260K")


def test_missing_model_file_names_file_id_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEALIGN_ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_model("stories260K")
    for part in ("models/stories260K/stories260K.bin", "karpathy/tinyllamas", "SAEALIGN_ASSETS"):
        assert part in str(e.value)


def test_gpt2_tokenizer_matches_test_vectors(mirror):
    tok = gpt2_tokenizer()
    samples = json.loads((SHARED / "models/gpt2-tokenizer/testvectors.json").read_text())["samples"]
    assert len(samples) == 7
    for s in samples:
        assert tok(s["text"])["input_ids"] == s["ids"], s["name"]
        assert tok.decode(s["ids"]) == s["text"]


def greedy_uncached(model, tokens, n):
    "Greedy decoding by re-running the whole sequence each step (no KV cache)."
    for _ in range(n):
        with torch.no_grad():
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens


@pytest.mark.parametrize("name,n", [("stories260K", 40), ("gpt2-small-random", 8)])
def test_cached_generation_equals_uncached(mirror, name, n):
    model = load_model(name)
    tokens = model.to_tokens(["Once upon a time", "The dog ran to the"][:1])
    cached = model.generate(tokens, max_new_tokens=n, do_sample=False, use_past_kv_cache=True,
                            stop_at_eos=False, verbose=False)
    assert torch.equal(cached, greedy_uncached(model, tokens, n))


def test_gpt2_small_random_shapes(mirror):
    model = load_model("gpt2-small-random")
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (12, 768, 50257)
    assert model.to_tokens("Hello world")[0].tolist() == [50256, 15496, 995]


def test_embedded_sae_fits_and_reconstructs(stories):
    sae = load_sae(model=stories)
    _, cache = stories.run_with_cache("Once upon a time, there was a little girl named Lily.",
                                      names_filter=sae.cfg.metadata.hook_name)
    x = cache[sae.cfg.metadata.hook_name][0, 1:]
    recon = sae.decode(sae.encode(x))
    explained = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert explained > 0.7


def test_sae_for_another_model_is_refused(mirror):
    gpt2 = load_model("gpt2-small-random")
    with pytest.raises(ValueError, match="expects d_in=64 but gpt2-small-random has 768"):
        load_sae("saealign-stories260K", model=gpt2)
