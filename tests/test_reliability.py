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
from saealign.core import DamagedFileError, atomic_write, cache_folder, cache_root, load_embedder
from saealign.models import load_model
from saealign.reference import ReferenceSet, build_reference_prompts, compute_reference
from saealign.scoring import STORY_TOPICS, LatentScores, score_latents
from saealign.steering import Clamp, Swap, generate

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


# --- the evaluation grid's resume ----------------------------------------------------------------

@pytest.fixture
def tiny_grid(model, sae, embedder, ref):
    sae_id = sae.cfg.metadata.hook_name
    return dict(model=model, embedder=embedder, saes={sae_id: sae}, references={sae_id: ref},
                topics={"sea": STORY_TOPICS["sea"][:6]}, prompts={"Once upon a time": "neutral"}, seeds=(0,),
                methods=("Original", "Clamp"), outputs=("error",), max_new_tokens=8, progress=False)


def test_grid_units_are_keyed_by_every_setting(tmp_path, tiny_grid):
    from saealign.evaluation import read_rows, run_grid
    path = tmp_path / "grid.jsonl"
    first = run_grid(path, **tiny_grid)
    assert len(first) == 2 and first.unit.nunique() == 2
    variants = [{"topics": {"sea": STORY_TOPICS["sea"][6:12]}}, {"seeds": (1,)}, {"max_new_tokens": 6},
                {"prompts": {"Once upon a time": "metaphor"}}, {"clamp_options": {"value": 2.0, "mode": "multiply"}}]
    seen = set(first.unit)
    for change in variants:
        n_before = len(read_rows(path))
        rows = run_grid(path, **{**tiny_grid, **change})
        new = set(rows.unit) - seen
        # every unit whose rows depend on the change is run anew; its old rows are never returned
        expected = 1 if "clamp_options" in change else 2
        assert len(rows) == 2 and len(new) == expected and len(read_rows(path)) == n_before + expected, change
        seen |= new
    again = run_grid(path, **tiny_grid)
    assert set(again.unit) == set(first.unit) and again.continuation.tolist() == first.continuation.tolist()


def test_grid_refuses_other_files_and_damaged_lines_untouched(tmp_path, tiny_grid):
    from saealign.evaluation import run_grid
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b'{"topic": "mine"}\n{"a partial last line')
    with pytest.raises(ValueError, match="notes.jsonl is not a saealign grid file.*left unchanged"):
        run_grid(notes, **tiny_grid)
    assert notes.read_bytes() == b'{"topic": "mine"}\n{"a partial last line'
    path = tmp_path / "grid.jsonl"
    run_grid(path, **tiny_grid)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:1] + [b"{damaged"] + lines[1:]) + b'{"cut')
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"grid.jsonl, line 2: not a grid row"):
        run_grid(path, **tiny_grid)
    assert path.read_bytes() == before  # not even the cut last line was removed
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ValueError, match="folder.jsonl is not a file"):
        run_grid(tmp_path / "folder.jsonl", **tiny_grid)


@pytest.mark.parametrize("change, match", [({"outputs": ("recon",)}, "outputs must be some of"),
                                           ({"outputs": "error"}, "outputs must be some of"),
                                           ({"seeds": ()}, "seeds must be a non-empty list"),
                                           ({"seeds": (0, 0)}, "seeds must be a non-empty list of distinct"),
                                           ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
                                           ({"prompts": {}}, "prompts must be a non-empty dict")])
def test_grid_rejects_bad_settings_before_writing(tmp_path, tiny_grid, change, match):
    from saealign.evaluation import run_grid
    path = tmp_path / "grid.jsonl"
    run_grid(path, **tiny_grid)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        run_grid(path, **{**tiny_grid, **change})
    with pytest.raises(ValueError, match=match):
        run_grid(tmp_path / "new.jsonl", **{**tiny_grid, **change})
    assert path.read_bytes() == before and not (tmp_path / "new.jsonl").exists()


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
    with caplog.at_level(logging.WARNING, logger="saealign.embedded"):
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
    monkeypatch.setattr(models, "fast_weights", lambda model: model)  # the stand-in below has no weights
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
