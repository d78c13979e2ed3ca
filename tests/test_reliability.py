"""Issue 13: nothing saved is trusted unchecked, no user file is touched, no bad input passes silently.
Each test injects one fault and asserts the error (or the recovery), and that nothing of the user's changed."""
import contextlib
import io
import json
import logging
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch

from saealign import core, models
from saealign import reference as R
from saealign.core import DamagedFileError, atomic_write, cache_folder, cache_root
from saealign.embeddings import load_embedder
from saealign.models import load_model
from saealign.reference import ReferenceSet, build_reference_prompts, compute_reference
from saealign.scoring import STORY_TOPICS, LatentScores, score_latents
from saealign.methods import Clamp, Swap
from saealign.steering import generate

MAX_TOKENS = 24


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("saealign-cache")
    monkeypatch.setenv("SAEALIGN_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def prompts():
    return build_reference_prompts(48, seed=2)


@pytest.fixture(scope="module")
def ref(model, sae, embedder, prompts):
    return compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=16, progress=False)


def snapshot(folder: Path) -> dict:
    "Every file under `folder` with its bytes (links as their target): what 'nothing changed' compares."
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    "Byte range of tensor `name` in a safetensors file (an 8-byte header length, a JSON header, then the data)."
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# --- integrity of what is saved -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["values", "prompt_counts", "col_indices", "crow_indices", "token_counts", "embeddings"])
def test_referenceset_with_a_flipped_byte_is_refused(ref, tmp_path, name):
    ref.save(tmp_path)
    begin, end = tensor_span(tmp_path / "reference.safetensors", name)
    flip_byte(tmp_path / "reference.safetensors", (begin + end) // 2)
    with pytest.raises(DamagedFileError, match=rf"reference.safetensors is damaged: tensors \['{name}'\].*delete"):
        ReferenceSet.load(tmp_path)


def test_referenceset_header_damage_and_truncation_are_refused(ref, tmp_path):
    ref.save(tmp_path)
    st = tmp_path / "reference.safetensors"
    good = st.read_bytes()
    st.write_bytes(good[:-50])
    with pytest.raises(DamagedFileError, match="reference.safetensors is unreadable"):
        ReferenceSet.load(tmp_path)
    meta_at = good.index(b'"json_sha256":"') + len('"json_sha256":"')  # a byte of the header's metadata
    st.write_bytes(good[:meta_at] + (b"0" if good[meta_at:meta_at + 1] != b"0" else b"1") + good[meta_at + 1:])
    with pytest.raises(DamagedFileError, match="its metadata does not match"):
        ReferenceSet.load(tmp_path)


def test_reordered_prompts_in_reference_json_are_refused(ref, tmp_path):
    ref.save(tmp_path)
    info = json.loads((tmp_path / "reference.json").read_text())
    info["prompts"] = info["prompts"][::-1]
    (tmp_path / "reference.json").write_text(json.dumps(info, indent=1))
    with pytest.raises(DamagedFileError, match="reference.json was changed after it was saved.*rebuild the ReferenceSet"):
        ReferenceSet.load(tmp_path)


def test_invalid_sparse_indices_are_refused_before_a_tensor_is_built(ref, tmp_path):
    "Checksums that match bad indices (a file written wrongly, not damaged later): torch would read out of bounds."
    s = ref.summaries
    col = s.col_indices().clone()
    col[0] = ref.d_sae + 1000
    R.save_pair(tmp_path / "reference", {"crow_indices": s.crow_indices(), "col_indices": col, "values": s.values(),
                                         "prompt_counts": ref.prompt_counts, "token_counts": ref.token_counts,
                                         "embeddings": ref.embeddings},
                {"format": R.FORMAT_VERSION, "fingerprint": ref.fingerprint, "d_sae": ref.d_sae, "meta": ref.meta,
                 "prompts": ref.prompts})
    with pytest.raises(DamagedFileError, match=r"reference.safetensors holds invalid sparse summaries"):
        ReferenceSet.load(tmp_path)


def test_latent_scores_damage_is_refused(ref, embedder, tmp_path):
    scores = score_latents(ref, STORY_TOPICS["sea"][:6], embedder, min_prompts=2)
    scores.save(tmp_path)
    assert torch.equal(LatentScores.load(tmp_path).scores, scores.scores)
    pristine = {p: p.read_bytes() for p in tmp_path.iterdir()}
    begin, _ = tensor_span(tmp_path / "scores.safetensors", "scores")
    flip_byte(tmp_path / "scores.safetensors", begin + 1)
    with pytest.raises(DamagedFileError, match=r"scores.safetensors is damaged: tensors \['scores'\].*rebuild the LatentScores"):
        LatentScores.load(tmp_path)
    for p, data in pristine.items():
        p.write_bytes(data)
    info = json.loads((tmp_path / "scores.json").read_text())
    info["align_texts"][0] = "An edited text."
    (tmp_path / "scores.json").write_text(json.dumps(info))
    with pytest.raises(DamagedFileError, match="scores.json was changed after it was saved"):
        LatentScores.load(tmp_path)


# --- the reference cache ------------------------------------------------------------------------

def cached_run(model, sae, embedder, prompts, cache_dir, monkeypatch):
    "compute_reference into `cache_dir`, returning the result and the chunk indices it computed."
    real, computed = R.compute_chunk, []
    monkeypatch.setattr(R, "compute_chunk", lambda m, s, part, *a, **k: computed.append(prompts.index(part[0]) // 16)
                        or real(m, s, part, *a, **k))
    out = compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=16, cache_dir=cache_dir,
                            progress=False)
    monkeypatch.setattr(R, "compute_chunk", real)
    return out, computed


def same_reference(a, b) -> bool:
    return (torch.equal(a.summaries.to_dense(), b.summaries.to_dense()) and torch.equal(a.embeddings, b.embeddings)
            and torch.equal(a.prompt_counts, b.prompt_counts) and a.fingerprint == b.fingerprint)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "another chunk's file"])
def test_damaged_chunk_is_recomputed_alone(model, sae, embedder, prompts, ref, tmp_path, monkeypatch, caplog, damage):
    cache = tmp_path / "cache"
    cached_run(model, sae, embedder, prompts, cache, monkeypatch)
    chunk = cache / "chunk_00001.safetensors"
    if damage == "flipped byte":
        begin, end = tensor_span(chunk, "values")
        flip_byte(chunk, (begin + end) // 2)
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-64])
    else:
        chunk.write_bytes((cache / "chunk_00002.safetensors").read_bytes())  # sound, same run, wrong index
    with caplog.at_level(logging.WARNING, logger="saealign.reference"):
        again, computed = cached_run(model, sae, embedder, prompts, cache, monkeypatch)
    assert computed == [1] and same_reference(again, ref)
    assert "chunk_00001.safetensors" in caplog.text and "recomputing that chunk" in caplog.text
    assert "different model" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saealign.reference"):
        _, computed = cached_run(model, sae, embedder, prompts, cache, monkeypatch)
    assert computed == [] and not caplog.text  # the chunk was written whole again


def test_garbage_manifest_is_rebuilt_from_the_chunks_that_verify(model, sae, embedder, prompts, ref, tmp_path,
                                                                 monkeypatch, caplog):
    cache = tmp_path / "cache"
    cached_run(model, sae, embedder, prompts, cache, monkeypatch)
    (cache / "manifest.json").write_bytes(b"\x00garbage{")
    with caplog.at_level(logging.WARNING, logger="saealign.reference"):
        again, computed = cached_run(model, sae, embedder, prompts, cache, monkeypatch)
    assert computed == [] and same_reference(again, ref)
    assert "manifest.json is damaged" in caplog.text and str(cache) in caplog.text
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["fingerprint"] == ref.fingerprint and len(manifest["chunks"]) == 3


def test_chunk_of_another_run_reports_its_own_fingerprint(model, sae, embedder, prompts, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first, _ = cached_run(model, sae, embedder, prompts, cache, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="saealign.reference"):
        other, computed = cached_run(model, sae, embedder, prompts[::-1], cache, monkeypatch)
    assert computed == [0, 1, 2] and "different model" in caplog.text
    shown = re.search(r"fingerprint (\w+)\.\.\., this run (\w+)\.\.\.", caplog.text).groups()
    assert shown == (first.fingerprint[:12], other.fingerprint[:12]) and shown[0] != shown[1]


# --- files the user owns -------------------------------------------------------------------------

def test_cache_dir_that_saealign_did_not_make_is_refused_untouched(model, sae, embedder, prompts, tmp_path):
    user = tmp_path / "my-folder"
    user.mkdir()
    (user / "chunk_notes.safetensors").write_bytes(b"my notes")
    (user / "manifest.json").write_text('{"mine": true}')
    before = snapshot(user)
    with pytest.raises(ValueError, match=r"my-folder is not empty and is not a saealign cache"):
        compute_reference(model, sae, prompts[:4], embedder, max_tokens=MAX_TOKENS, cache_dir=user, progress=False)
    assert snapshot(user) == before


def test_cache_folder_marker_rules(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cache_folder(empty, "reference") == empty and (empty / ".saealign-cache").is_file()  # adopted
    assert cache_folder(empty, "reference") == empty  # recognised by its marker
    with pytest.raises(ValueError, match="is saealign's reference cache, not a embeddings cache"):
        cache_folder(empty, "embeddings")
    (empty / ".saealign-cache").write_text("{garbage")
    with pytest.raises(ValueError, match=r"\.saealign-cache is damaged.*delete the folder"):
        cache_folder(empty, "reference")
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ValueError, match="is a file; the reference cache must be a folder"):
        cache_folder(tmp_path / "a-file", "reference")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_planted_links_are_never_followed(model, sae, embedder, prompts, tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    cache = tmp_path / "cache"
    compute_reference(model, sae, prompts[:4], embedder, max_tokens=MAX_TOKENS, cache_dir=cache, progress=False)
    (cache / "manifest.json.tmp").symlink_to(victim)  # the fixed temporary name of earlier versions
    names = iter(["planted", "planted", "fresh"])  # the first temporary name drawn is taken by a link
    (cache / ".manifest.json.planted.tmp").symlink_to(victim)
    monkeypatch.setattr(core.secrets, "token_hex", lambda n: next(names, "later"))
    atomic_write(cache / "manifest.json", "{}")
    assert victim.read_text() == "the user's file" and (cache / "manifest.json").read_text() == "{}"
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    atomic_write(link, "new")  # the link itself is replaced, never what it points to
    assert victim.read_text() == "the user's file" and not link.is_symlink() and link.read_text() == "new"


def test_saealign_cache_naming_a_file_is_one_clear_error(tmp_path, monkeypatch):
    from saealign.cli import main
    (tmp_path / "cache-file").write_text("mine")
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache-file"))
    with pytest.raises(ValueError, match=r"SAEALIGN_CACHE=.*cache-file' is a file, not a folder"):
        cache_root()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["grid", "--seeds", "1", "--classifier", "none"]) == 1
    assert "is a file, not a folder" in err.getvalue() and err.getvalue().count("\n") == 1
    assert (tmp_path / "cache-file").read_text() == "mine"


def test_damaged_token_cache_is_sampled_again(model, tmp_path, monkeypatch, caplog):
    first = R.model_stories(model, 4, length=8, seed=5)
    (f,) = (cache_root() / "reference" / "stories").glob("*.safetensors")
    begin, _ = tensor_span(f, "tokens")
    flip_byte(f, begin)
    with caplog.at_level(logging.WARNING, logger="saealign.corpus"):
        assert R.model_stories(model, 4, length=8, seed=5) == first
    assert f.name in caplog.text and "sampling again" in caplog.text


# --- inputs that passed silently or failed obscurely -----------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts="one prompt"), "prompts is a single string: pass a list"),
    (dict(max_tokens=-5), "max_tokens must be a positive int, got -5"),
    (dict(max_tokens=0), "max_tokens must be a positive int, got 0"),
    (dict(max_tokens=10_000), "exceeds stories260K's context of 512"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(chunk_size=-1), "chunk_size must be a positive int"),
])
def test_compute_reference_rejects_bad_sizes_and_a_bare_string(model, sae, embedder, kwargs, match):
    args = dict(prompts=["Once upon a time", "The dog ran."]) | kwargs
    with pytest.raises(ValueError, match=match):
        compute_reference(model, sae, args.pop("prompts"), embedder, progress=False, **args)


@pytest.mark.parametrize("call, match", [
    (lambda m, s: generate(m, None, "Once", temperature=-1), "temperature must be a finite number >= 0"),
    (lambda m, s: generate(m, None, "Once", temperature=math.inf), "temperature"),
    (lambda m, s: generate(m, None, "Once", max_new_tokens=0), "max_new_tokens must be a positive int, got 0"),
    (lambda m, s: generate(m, s, "Once", Swap(torch.ones(s.cfg.d_sae)), max_new_tokens=-2), "max_new_tokens"),
    (lambda m, s: generate(m, None, "Once", top_k=0), "top_k must be a positive int, got 0"),
    (lambda m, s: generate(m, None, None), "prompts must be a string or a list of strings"),
    (lambda m, s: generate(m, None, ["Once", None]), "prompts must be a string or a list of strings"),
    (lambda m, s: Clamp(torch.ones(s.cfg.d_sae), value=math.nan), "Clamp value must be a finite number"),
    (lambda m, s: Clamp(torch.ones(s.cfg.d_sae), value=math.inf), "Clamp value must be a finite number"),
    (lambda m, s: Swap(["0.5"] * s.cfg.d_sae), "scores must be numbers"),
    (lambda m, s: Swap("0.5"), "scores must be numbers"),
    (lambda m, s: score_latents(None, ["a text"], None), "score_latents needs a ReferenceSet"),
    (lambda m, s: load_model(None), "the model name must be a string"),
])
def test_bad_inputs_are_one_line_that_says_what_to_change(model, sae, call, match):
    with pytest.raises(ValueError, match=match) as e:
        call(model, sae)
    assert "\n" not in str(e.value)


def test_load_embedder_names_a_missing_path():
    with pytest.raises(FileNotFoundError, match="'/no/such/dir': that path does not exist"):
        load_embedder("/no/such/dir")
    with pytest.raises(FileNotFoundError, match="that path does not exist"):
        load_embedder("./no/such/dir")


def test_too_long_prompt_reports_its_real_length(model):
    prompt = "Once upon a time " * 600
    n = len(model.to_tokens(prompt, truncate=False)[0])
    assert n > model.cfg.n_ctx
    with pytest.raises(ValueError, match=f"has {n} tokens"):
        generate(model, None, prompt, max_new_tokens=4)


# --- the CLI checks before it runs -----------------------------------------------------------------

def run_cli(argv) -> tuple[int, str]:
    from saealign.cli import main
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("report, match", [("{tmp}", "is a folder"), ("{tmp}/missing/r.html", "not an existing folder"),
                                           ("{tmp}/a-file/r.html", "not an existing folder")])
def test_cli_checks_the_report_path_first(tmp_path, monkeypatch, report, match):
    import saealign.cli as cli
    (tmp_path / "topic.txt").write_text("The sea is blue.\n")
    (tmp_path / "a-file").write_text("mine")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    code, err = run_cli(["align", "--topic-file", str(tmp_path / "topic.txt"), "--prompt", "x",
                         "--report", report.format(tmp=tmp_path)])
    assert code == 1 and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_cli_rejects_bad_counts_before_running(tmp_path, monkeypatch):
    import saealign.cli as cli
    (tmp_path / "topic.txt").write_text("The sea is blue.\n")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    code, err = run_cli(["align", "--topic-file", str(tmp_path / "topic.txt"), "--prompt", "x", "--max-new-tokens", "-1"])
    assert code == 1 and "max_new_tokens must be a positive int, got -1" in err
    code, err = run_cli(["grid", "--out", str(tmp_path / "g.jsonl"), "--seeds", "0"])
    assert code == 1 and "--seeds must be at least 1" in err and not (tmp_path / "g.jsonl").exists()


# --- transformer_lens checkpoints that are pickles ------------------------------------------------------

def test_pickle_prefixes_match_transformer_lens():
    "Our list is the repositories whose .pth files transformer_lens 3.9 reads with torch.load(weights_only=False)."
    import inspect
    from transformer_lens import loading_from_pretrained as lfp
    source = inspect.getsource(lfp.get_pretrained_state_dict)
    assert "weights_only=False" in inspect.getsource(lfp.utils.download_file_from_hf)
    branch = source[:source.index("download_file_from_hf")]
    assert set(re.findall(r'official_model_name\.startswith\("(\w+)"\)', branch)) == set(models.PICKLE_CHECKPOINT_PREFIXES)


def test_pickled_checkpoints_are_refused_before_any_download(monkeypatch):
    from sae_lens import HookedSAETransformer
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES
    loaded = []
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    monkeypatch.setattr(models, "for_inference", lambda model: model)  # the stand-in below has no weights
    monkeypatch.setattr(HookedSAETransformer, "from_pretrained",
                        classmethod(lambda cls, name, **k: loaded.append(name) or torch.nn.Identity()))
    pickled = [n for n in OFFICIAL_MODEL_NAMES if n.startswith(models.PICKLE_CHECKPOINT_PREFIXES)]
    assert "NeelNanda/SoLU_1L512W_C4_Code" in pickled
    for name in pickled + ["solu-1l", "attn-only-2l"]:
        with pytest.raises(ValueError, match="from a pickle.*allow_pickle=True"):
            load_model(name)
    assert loaded == []
    load_model("solu-1l", allow_pickle=True)  # the user's explicit choice
    load_model("gpt2")  # safetensors through transformers: no question asked
    assert loaded == ["solu-1l", "gpt2"]
    code, err = run_cli(["align", "--topic-file", __file__, "--prompt", "x", "--model", "solu-1l", "--sae", "a/b",
                         "--report", ""])
    assert code == 1 and "--allow-pickle" in err and len(loaded) == 2


# === Issue 26: the surfaces added since (converted model, per-topic caches, scores, strengths, grid rows, Ray) ===

FAKE_GGUF = b"GGUF: a stand-in for the assembled file"


@pytest.fixture
def fake_gemma(monkeypatch):
    "gemma_folder with a stand-in GGUF package and dequantization writing three small files: every check, no model."
    import hashlib
    import types
    pkg = types.SimpleNamespace(MODEL_NAME="fake.gguf", EXPECTED_SHA256=hashlib.sha256(FAKE_GGUF).hexdigest(),
                                assemble=lambda path: path.write_bytes(FAKE_GGUF) and path)
    conversions = []

    def dequantize(gguf, out):
        conversions.append(out)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text('{"tie_word_embeddings": true}')
        (out / "tokenizer.json").write_text('{"model": "bpe"}')

    monkeypatch.setattr(models, "gguf_package", lambda: pkg)
    monkeypatch.setattr(models, "_dequantize", dequantize)
    return pkg, conversions


def _rewrite_record(folder):
    (folder / "conversion.json").write_text(json.dumps({"format": 1, "gguf_sha256": "x", "weights_sha256": "y"}))


@pytest.mark.parametrize("damage, why", [
    (lambda f: (f / "config.json").write_text('{"tie_word_embeddings": false}'), "config.json changed"),
    (lambda f: (f / "config.json").write_bytes((f / "config.json").read_bytes()[:9]), "config.json changed"),
    (lambda f: (f / "config.json").write_bytes(b"\x00\xffgarbage"), "config.json changed"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda f: (f / "tokenizer.json").write_text("{}"), "tokenizer.json changed"),
    (lambda f: (f / "pytorch_model.bin").write_bytes(b"?"), "it holds pytorch_model.bin, which the conversion did not write"),
    (lambda f: (f / "conversion.json").write_text("{not json"), "its conversion.json is unreadable"),
    (_rewrite_record, "it was written by an older saealign")])
def test_damaged_converted_folder_is_rebuilt_saying_why(fake_gemma, capsys, damage, why):
    _, conversions = fake_gemma
    folder = models.gemma_folder()
    good = snapshot(folder)
    assert models.gemma_folder() == folder and len(conversions) == 1  # intact: not converted again
    damage(folder)
    capsys.readouterr()
    assert models.gemma_folder() == folder and snapshot(folder) == good and len(conversions) == 2
    assert f"rebuilt: {why}" in capsys.readouterr().out


def test_conversion_record_covers_every_file(fake_gemma):
    folder = models.gemma_folder()
    record = json.loads((folder / "conversion.json").read_text())
    assert record["format"] == models.CONVERSION_FORMAT and set(record["files"]) == {"model.safetensors", "config.json",
                                                                                      "tokenizer.json"}


def test_what_a_killed_conversion_left_is_removed(fake_gemma):
    pkg, _ = fake_gemma
    root = cache_root() / "models"
    folder = models.gemma_folder()
    partial, assembled = root / f"{folder.name}.k1ll3d.partial", root / f".{folder.name}.gguf-k1ll3d"
    for left in (partial, assembled):
        left.mkdir()
        (left / "big").write_bytes(b"x" * 1000)
    (folder / "config.json").write_text("{}")  # so that the next call converts
    models.gemma_folder()
    assert not partial.exists() and not assembled.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([".saealign-cache", f".{folder.name}.lock", folder.name])


def test_two_conversions_at_once_convert_once(fake_gemma):
    import threading
    _, conversions = fake_gemma
    found, errors = [], []

    def run():
        try:
            found.append(models.gemma_folder())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(found)) == 1 and len(conversions) == 1


def test_converted_folder_is_readable_by_others(fake_gemma):
    mask = os.umask(0o022)
    try:
        folder = models.gemma_folder()
    finally:
        os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


def test_damaged_gguf_part_says_how_to_reinstall(fake_gemma):
    pkg, conversions = fake_gemma

    def bad_assemble(path):
        raise ValueError("Assembled file sha256 did not match expected value")

    pkg.assemble = bad_assemble
    with pytest.raises(ValueError, match=r"could not assemble fake.gguf.*did not match.*--force-reinstall"):
        models.gemma_folder()
    root = cache_root() / "models"
    assert not conversions and not [p for p in root.iterdir() if p.name.endswith(("partial", "fake.gguf"))]
    assert not list(root.glob(".*gguf-*"))


def test_trust_remote_code_is_an_opt_in(monkeypatch):
    from sae_lens import HookedSAETransformer
    from transformer_lens.loading_from_pretrained import NEED_REMOTE_CODE_MODELS, OFFICIAL_MODEL_NAMES
    loaded = []
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    monkeypatch.setattr(models, "for_inference", lambda model: model)
    monkeypatch.setattr(HookedSAETransformer, "from_pretrained",
                        classmethod(lambda cls, name, **k: loaded.append(name) or torch.nn.Identity()))
    remote = [n for n in OFFICIAL_MODEL_NAMES if n.startswith(NEED_REMOTE_CODE_MODELS)]
    assert "microsoft/phi-2" in remote and any(n.startswith("Qwen/") for n in remote)
    for name in remote + ["phi-2"]:
        with pytest.raises(ValueError, match="runs Python code from the model's hub repository.*trust_remote_code=True"):
            load_model(name)
    assert loaded == []
    load_model("phi-2", trust_remote_code=True)
    assert loaded == ["phi-2"]
    code, err = run_cli(["align", "--topic-file", __file__, "--prompt", "x", "--model", "phi-2", "--sae", "a/b",
                         "--report", ""])
    assert code == 1 and "--trust-remote-code" in err and len(loaded) == 1


# --- the reference pass's memory ------------------------------------------------------------------------

def test_reference_batches_hold_at_most_a_token_budget(model, sae, embedder, prompts, ref, monkeypatch):
    shapes, real = [], R.summarize_batch
    monkeypatch.setattr(R, "BATCH_TOKENS", 40)
    monkeypatch.setattr(R, "summarize_batch", lambda m, s, tokens, mask: shapes.append(tuple(tokens.shape))
                        or real(m, s, tokens, mask))
    small = compute_reference(model, sae, prompts, embedder, max_tokens=MAX_TOKENS, chunk_size=16, progress=False)
    assert shapes and max(b * t for b, t in shapes) <= 40 and sum(b for b, _ in shapes) == len(prompts)
    assert small.fingerprint == ref.fingerprint  # batching is not a setting: the same cache, the same result
    torch.testing.assert_close(small.summaries.to_dense(), ref.summaries.to_dense(), atol=1e-6, rtol=0)


def test_a_long_cut_asked_for_is_warned_about(model, sae, monkeypatch, caplog):
    monkeypatch.setattr(model.cfg, "n_ctx", 32768)  # Gemma 3's context
    with caplog.at_level(logging.WARNING, logger="saealign.reference"):
        # the default keeps the context as the cut (cached reference sets keep their fingerprints): no warning
        assert R.reference_plan(model, sae, None, "d", 8, None)["max_tokens"] == 32768
        assert "one prompt that long" not in caplog.text
        R.reference_plan(model, sae, None, "d", 8, 32768)
    assert re.search(r"max_tokens=32768: one prompt that long needs about [\d.]+ GB", caplog.text)


# --- per-topic caches record their own key ------------------------------------------------------------------

def test_activation_means_under_another_key_are_measured_again(model, sae, ref, tmp_path, caplog):
    from saealign.additive import reference_means
    want = reference_means(model, sae, ref, n=48, cache_dir=tmp_path)
    (mine,) = tmp_path.glob("*.safetensors")
    reference_means(model, sae, ref, n=16, cache_dir=tmp_path)
    (other,) = set(tmp_path.glob("*.safetensors")) - {mine}
    mine.write_bytes(other.read_bytes())  # a valid file, of other means, under this key's name
    with caplog.at_level(logging.WARNING, logger="saealign.additive"):
        got = reference_means(model, sae, ref, n=48, cache_dir=tmp_path)
    assert "its key differs" in caplog.text
    torch.testing.assert_close(got.resid, want.resid)
    torch.testing.assert_close(got.latents, want.latents)
    assert got.n_tokens == want.n_tokens and mine.read_bytes() != other.read_bytes()  # rewritten


def test_output_scores_under_another_key_are_measured_again(model, sae, ref, embedder, tmp_path, caplog):
    from saealign.output_scores import output_scores
    neutral = ["Once upon a time", "One day"]
    scores = {t: score_latents(ref, STORY_TOPICS[t], embedder, min_prompts=1) for t in ("sea", "food")}
    run = lambda t: output_scores(model, sae, scores[t], STORY_TOPICS[t], neutral, n_latents=6,
                                  reference_texts=ref.prompts, cache_dir=tmp_path)
    sea = run("sea")
    (mine,) = tmp_path.glob("*.safetensors")
    run("food")
    (other,) = set(tmp_path.glob("*.safetensors")) - {mine}
    mine.write_bytes(other.read_bytes())  # the food topic's file under the sea topic's key
    with caplog.at_level(logging.WARNING, logger="saealign.output_scores"):
        again = run("sea")
    assert not again.cached and "its key differs" in caplog.text
    assert torch.equal(again.latents, sea.latents)
    torch.testing.assert_close(again.scores, sea.scores, equal_nan=True)
    assert run("sea").cached  # rewritten whole


def test_sampled_tokens_under_another_key_are_sampled_again(model, caplog):
    first = R.model_stories(model, 4, length=8, seed=5)
    R.model_stories(model, 4, length=8, seed=6)
    mine, other = (next((cache_root() / "reference" / "stories").glob(f"*seed{s}.safetensors")) for s in (5, 6))
    mine.write_bytes(other.read_bytes())  # seed 6's stories under seed 5's name
    with caplog.at_level(logging.WARNING, logger="saealign.corpus"):
        assert R.model_stories(model, 4, length=8, seed=5) == first
    assert "not for this key" in caplog.text and "sampling again" in caplog.text


# --- scores know their SAE ------------------------------------------------------------------------------

def test_scores_of_another_sae_are_refused(model, sae, ref, embedder, tmp_path):
    from saealign.saes import load_sae
    from saealign.methods import OutputSwap
    from saealign.output_scores import OutputScores
    scores = score_latents(ref, STORY_TOPICS["sea"], embedder, min_prompts=1)
    other = load_sae(model=model)
    with torch.no_grad():
        other.W_enc[0, 0] += 1.0  # the same width, other weights
    assert generate(model, sae, "Once upon a time", Swap(scores), max_new_tokens=2)  # its own SAE
    d = sae.cfg.d_sae
    measured = OutputScores(torch.linspace(1, 0, d), torch.zeros(d), torch.arange(8), torch.tensor([5]), {}, 0.0)
    for method in (Swap(scores), Clamp(scores), OutputSwap(scores, measured), Swap(LatentScores.load(scores.save(tmp_path)))):
        with pytest.raises(ValueError, match="scores were computed for another SAE"):
            generate(model, other, "Once upon a time", method, max_new_tokens=2)
    generate(model, other, "Once upon a time", Swap(scores.scores), max_new_tokens=2)  # a bare vector: nothing to check


# --- strengths ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("multiplier", [-1e9, 1e9, 101.0, float("inf"), float("nan"), True, "2"])
def test_multiplier_out_of_bounds_is_refused(model, sae, ref, multiplier):
    from saealign.additive import TopicInputs
    with pytest.raises(ValueError, match=r"multiplier must be a finite number in \[-100, 100\]"):
        TopicInputs(model, sae, ref, STORY_TOPICS["sea"], None, multiplier=multiplier)


def test_multiplier_within_bounds_is_taken(model, sae, ref):
    from saealign.additive import TopicInputs
    for multiplier in (-100, -2.0, 0, 16, 100.0):
        assert TopicInputs(model, sae, ref, STORY_TOPICS["sea"], None, multiplier=multiplier).multiplier == multiplier


def test_a_mean_difference_of_float_noise_is_refused(model, sae, ref):
    from saealign.additive import DiffMeans, TopicInputs, activation_means, matched_strengths
    from saealign.registry import make_method
    texts = ref.prompts[:16]
    align = activation_means(model, sae, texts)
    same = activation_means(model, sae, texts[::-1], batch_size=5)  # the same texts in other batches
    with pytest.raises(ValueError, match="there is no direction to add"):
        DiffMeans.from_means(torch.ones(sae.cfg.d_sae), align, same)
    with pytest.raises(ValueError, match="there is no norm to match"):
        matched_strengths(sae, align, same, [0, 1])
    inputs = TopicInputs(model, sae, ref, ref.prompts, None, given_reference_means=activation_means(model, sae, ref.prompts[::-1]),
                         given_scores=LatentScores.of(torch.ones(sae.cfg.d_sae)))
    with pytest.raises(ValueError, match="no direction"):
        make_method("DiffMeans", inputs)


# --- topic texts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts, match", [(None, "must be a list of strings.*not NoneType"),
                                          (b"sea", "must be a list of strings.*not bytes"),
                                          (["\x00" * 8], "NUL or other control characters at positions \\[0\\]"),
                                          (["The sea.", "\x1b[2J\x07"], "control characters at positions \\[1\\]")])
def test_texts_that_are_not_text_are_refused(ref, embedder, texts, match):
    with pytest.raises(ValueError, match=match):
        score_latents(ref, texts, embedder)


def test_topic_file_of_control_characters_is_refused_and_a_bom_stripped(tmp_path, monkeypatch):
    from saealign import cli
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "nul.txt").write_bytes(b"\x00" * 100)
    (tmp_path / "ctl.txt").write_bytes(b"The sea.\nwith with\x08\x08 happ\n")
    for name, line in (("nul.txt", 1), ("ctl.txt", 2)):
        code, err = run_cli(["align", "--topic-file", str(tmp_path / name), "--prompt", "x", "--report", ""])
        assert code == 1 and "control character" in err and f"line {line}" in err, err
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfThe sea.\nThe waves.\n")
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf["The sea."]')
    assert cli.read_topic_file(tmp_path / "bom.txt") == ["The sea.", "The waves."]
    assert cli.read_topic_file(tmp_path / "bom.json") == ["The sea."]


@pytest.mark.parametrize("report, match", [("/proc/version", "takes no new files"), ("/dev/null", "not a regular file")])
def test_report_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch, report, match):
    from saealign import cli
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "t.txt").write_text("The sea.\n")
    code, err = run_cli(["align", "--topic-file", str(tmp_path / "t.txt"), "--prompt", "x", "--report", report])
    assert code == 1 and match in err, err


# --- steer_by_text's options ---------------------------------------------------------------------------------

def test_steer_by_text_takes_the_multiplier_and_names_what_a_method_does_not_take(model, sae, embedder, ref):
    from saealign.align import steer_by_text
    run = lambda **k: steer_by_text(STORY_TOPICS["sea"], "Once upon a time", model=model, sae=sae, embedder=embedder,
                                    reference=ref, max_new_tokens=4, **k)
    one, two = run(method="DiffMeans"), run(method="DiffMeans", multiplier=2.0)
    torch.testing.assert_close(two.method.vector, 2 * one.method.vector)
    for kwargs, match in [({"method": "DiffMeans", "multiplier": float("nan")}, "multiplier must be a finite number"),
                          ({"method": "MatchedSteer", "multiplier": -1e9}, r"in \[-100, 100\]"), ({"method": "Swap", "multiplier": 2.0},
                                                                   "Swap does not take multiplier")]:
        with pytest.raises(ValueError, match=match):
            run(**kwargs)


# --- cache folders made by two processes at once ----------------------------------------------------------------

def test_cache_folder_another_process_is_making_is_adopted(tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / f".{core.CACHE_MARKER}.1a2b3c.tmp").write_text("{")  # the other's marker, not yet renamed
    assert cache_folder(folder, "embeddings") == folder
    assert json.loads((folder / core.CACHE_MARKER).read_text())["kind"] == "embeddings"


def test_cache_folder_races_give_no_false_error(tmp_path):
    import threading
    errors = []
    for round_ in range(40):
        target = tmp_path / f"race{round_}"
        gate = threading.Barrier(4)

        def make():
            gate.wait()
            try:
                cache_folder(target, "reference")
            except ValueError as e:
                errors.append(e)

        threads = [threading.Thread(target=make) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


# --- Ray: fail fast, the user's own error --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_one_cpu():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_bad_sizes_are_refused_on_the_driver(monkeypatch):
    from saealign.distributed import Recipe, compute_reference_ray
    ray = pytest.importorskip("ray")
    for kwargs, match in [({"chunk_size": 0}, "chunk_size must be a positive int"),
                          ({"max_tokens": -5}, "max_tokens must be a positive int"),
                          ({"num_gpus": -1}, "num_gpus must be a number >= 0")]:
        with pytest.raises(ValueError, match=match):
            compute_reference_ray(Recipe("stories260K"), ["Once upon a time"], **kwargs)
    assert not ray.is_initialized()  # refused before Ray started


def test_ray_gpus_asked_for_on_a_cpu_cluster_fail_at_once(ray_one_cpu):
    import time
    from saealign.distributed import Recipe, compute_reference_ray
    start = time.perf_counter()
    with pytest.raises(ValueError, match="num_gpus=1 per worker, but the Ray cluster has 0 GPUs"):
        compute_reference_ray(Recipe("stories260K"), ["Once upon a time"], num_gpus=1)
    assert time.perf_counter() - start < 10


def test_ray_remote_error_is_raised_as_the_users(ray_one_cpu):
    from saealign.distributed import Recipe, compute_reference_ray
    with pytest.raises(ValueError, match=r"^unknown model 'no-such-model'"):
        compute_reference_ray(Recipe("no-such-model", embedder=False), ["Once upon a time"], progress=False)
