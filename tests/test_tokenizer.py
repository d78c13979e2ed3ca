import random
import re
import struct
from pathlib import Path

import pytest

from conftest import SHARED
from saealign.models import llama2c_tokenizer, read_llama2c_vocab

TOK_BIN = SHARED / "models/stories260K/tok512.bin"
COLA = SHARED / "data/cola/in_domain_train.tsv"
pytestmark = pytest.mark.skipif(not TOK_BIN.exists(), reason="stories260K tokenizer not available")

FIXED = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world", "", " ", "a  b", "héllo wörld 🙂", "日本語", "Tab\there\nnewline",
    "  leading and trailing  ", "<s> literal </s> <unk> <0x41>", "\n", "🙂🙂", "é",
]


# ---- independent reference: a transcription of llama2.c run.c `encode`, working on bytes ----
def _read_bin(path):
    data = Path(path).read_bytes()
    off, pieces, scores = 4, [], []
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return pieces, scores


PIECES, SCORES = _read_bin(TOK_BIN) if TOK_BIN.exists() else ([], [])
LOOKUP = {p: i for i, p in enumerate(PIECES)}


def ref_encode(text: str) -> list[int]:
    b = text.encode("utf-8")
    toks = [1]  # bos=1; BOS takes part in the merge loop, as in run.c
    if b:
        toks.append(LOOKUP[b" "])  # dummy prefix
    i = 0
    while i < len(b):  # one UTF-8 codepoint (lead byte + up to 3 continuation bytes)
        j = i + 1
        while j < len(b) and (b[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        cp = b[i:j]
        toks.extend([LOOKUP[cp]] if cp in LOOKUP else [x + 3 for x in cp])
        i = j
    while True:  # merge the best-scoring pair; strict '>' keeps the leftmost on ties
        best_score, best_id, best_idx = -1e10, -1, -1
        for k in range(len(toks) - 1):
            idx = LOOKUP.get(PIECES[toks[k]] + PIECES[toks[k + 1]], -1)
            if idx != -1 and SCORES[idx] > best_score:
                best_score, best_id, best_idx = SCORES[idx], idx, k
        if best_idx == -1:
            return toks
        toks[best_idx : best_idx + 2] = [best_id]


def _random_strings(n=400, seed=0):
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x17F), (0x370, 0x3FF), (0x4E00, 0x9FFF),
              (0x1F300, 0x1FAFF), (0x1, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    vocab_pieces = [p.decode() for p in PIECES[259:]]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 25)):
            if rng.random() < 0.4:  # glue vocab pieces together to exercise many merges
                parts.append(rng.choice(vocab_pieces))
            else:  # NUL excluded: run.c sees C strings; surrogates are not encodable
                lo, hi = rng.choice(ranges)
                parts.append(chr(rng.randint(lo, hi)))
        out.append("".join(parts))
    return out


def _cola(n=2000):
    if not COLA.exists():
        pytest.skip("CoLA data not available")
    lines = COLA.read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[3] for line in lines[:n]]


@pytest.fixture(scope="module")
def tok():
    return llama2c_tokenizer(TOK_BIN)


def _check_all(tok, texts):
    bad = [(t, tok.encode(t), ref_encode(t)) for t in texts if tok.encode(t) != ref_encode(t)]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"
    trips = [t for t in texts if tok.decode(tok.encode(t), skip_special_tokens=True) != t]
    assert not trips, f"{len(trips)} round-trip failures, first: {trips[0]!r}"


def test_reference_sanity():
    # Guard against a broken reference making the comparisons vacuous.
    assert ref_encode("") == [1]
    assert ref_encode("Once upon a time") == [1, 403, 407, 261, 378]


@pytest.mark.parametrize("text", FIXED)
def test_fixed_strings(tok, text):
    _check_all(tok, [text])


def test_cola(tok):
    texts = _cola()
    assert len(texts) == 2000
    _check_all(tok, texts)


def test_random_unicode(tok):
    _check_all(tok, _random_strings())


def test_batch_matches_single(tok):
    texts = _cola(50) + _random_strings(50, seed=1)
    assert tok(texts)["input_ids"] == [ref_encode(t) for t in texts]


def test_special_tokens_and_padding(tok):
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 0)
    assert tok.encode("") == [1]  # non-empty: TransformerLens sees that BOS is prepended
    assert tok.encode("hi", add_special_tokens=False) == ref_encode("hi")[1:]
    assert tok.pad_token == "<unk>" and tok.padding_side == "right"
    out = tok(["Once upon a time", "a"], padding=True)
    assert out["input_ids"][1] == ref_encode("a") + [0] * 3
    assert out["attention_mask"][1] == [1, 1, 0, 0, 0]
    assert tok.decode([1, 2], skip_special_tokens=True) == ""


def test_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    texts = FIXED + _random_strings(50, seed=2)
    assert [tok2.encode(t) for t in texts] == [ref_encode(t) for t in texts]
    assert tok2.pad_token == "<unk>" and tok2.padding_side == "right"


def _malformed(tmp_path, data):
    p = tmp_path / "broken_tok.bin"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(p))):
        llama2c_tokenizer(p)


@pytest.mark.parametrize("cut", [0, 3, 4, 10, 2000, -1])
def test_truncated_file(tmp_path, cut):
    _malformed(tmp_path, TOK_BIN.read_bytes()[:cut])


def test_bad_length_and_trailing(tmp_path):
    data = bytearray(TOK_BIN.read_bytes())
    bad_len = data.copy()
    struct.pack_into("<i", bad_len, 8, -5)  # length field of token 0
    _malformed(tmp_path, bytes(bad_len))
    struct.pack_into("<i", bad_len, 8, 1 << 30)
    _malformed(tmp_path, bytes(bad_len))
    _malformed(tmp_path, bytes(data) + b"\0" * 9)  # more tokens than vocab_size


def test_no_tie_ambiguity():
    # HF ranks merges statically while llama2.c breaks equal-score ties by position; that can
    # only differ if two different overlapping pairs (A+B, B+C) yield equal-score pieces.
    res = [i for i in range(259, len(PIECES)) if len(PIECES[i]) > 1]
    splits = {i: {(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in LOOKUP and p[k:] in LOOKUP}
              for i in res for p in [PIECES[i]]}
    assert len({SCORES[i] for i in res}) == len(res)  # distinct scores -> only same-piece overlaps
    assert not [i for i in res for a, b in splits[i] for b2, c in splits[i] if b == b2 and a != c]


def test_load_vocab_shape():
    pieces, scores = read_llama2c_vocab(TOK_BIN)
    assert len(pieces) == len(scores) == 512 and pieces[3] == "<0x00>"


def test_transformer_lens(tok):
    tl = pytest.importorskip("transformer_lens")
    import torch

    torch.manual_seed(0)
    cfg = tl.HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=64, d_head=4, n_heads=4, d_vocab=512, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, d_mlp=32,
    )
    model = tl.HookedTransformer(cfg, tokenizer=tok)
    text = "Once upon a time"
    tokens = model.to_tokens(text)
    assert tokens[0].tolist() == ref_encode(text) == tok.encode(text)
    assert model.to_string(tokens[0, 1:]) == text
    assert model.to_tokens(text, prepend_bos=False)[0].tolist() == ref_encode(text)[1:]
    # Single tokens are decoded alone, so the Strip decoder drops their leading space.
    assert model.to_str_tokens(text) == ["<s>", "Once", "upon", "a", "time"]
    batch = model.to_tokens(["Once upon a time", "a"])  # right-padded with <unk> (0)
    assert batch[1].tolist() == ref_encode("a") + [0] * 3
    out = model.generate("Once upon", max_new_tokens=5, do_sample=False, verbose=False)
    assert isinstance(out, str) and out.startswith("Once upon") and "<s>" not in out
