"""The evaluation grid (saealign.grid): its file format, unit keys that resume the committed grids, and runs on
stories260K that resume, rerun only what changed, and never touch a file they did not make."""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from saealign import grid as G
from saealign.grid import grid_units, read_rows, run_grid, unit_key
from saealign.reference import ReferenceSet, build_reference_prompts, compute_reference
from saealign.scoring import STORY_TOPICS

RESULTS = Path(__file__).resolve().parents[1] / "results"
COMMITTED = sorted(RESULTS.glob("grid-*.jsonl"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path_factory.mktemp("saealign-cache")))


@pytest.fixture(scope="module")
def ref(model, sae, embedder):
    return compute_reference(model, sae, build_reference_prompts(48, seed=2), embedder, max_tokens=24, chunk_size=16,
                             progress=False)


# --- the file format, without a model -------------------------------------------------------------

UNIT = dict(topic="t", method="Original", sae="", output="")


def test_grid_file_round_trip(tmp_path):
    path = tmp_path / "grid.jsonl"
    written = [[dict(unit="u1", unit_rows=2, **UNIT, seed=s, perplexity=1.5 + s) for s in (0, 1)],
               [dict(unit="u2", unit_rows=1, **UNIT, seed=0, perplexity=float("nan"))]]
    for rows in written:
        G._append_rows(path, rows)
    assert json.loads(path.read_text().splitlines()[0]) == G.GRID_HEADER
    back = read_rows(path)
    assert [(r["unit"], r["unit_row"], r["seed"]) for r in back] == [("u1", 0, 0), ("u1", 1, 1), ("u2", 0, 0)]
    assert all(r["row_sha256"] == G.row_digest(r) for r in back)
    assert [r["perplexity"] for r in back[:2]] == [1.5, 2.5] and back[2]["perplexity"] != back[2]["perplexity"]  # NaN
    assert G._complete_units(path) == {"u1", "u2"}


def test_damaged_grid_row_is_left_out_and_its_unit_dropped(tmp_path, caplog):
    path = tmp_path / "grid.jsonl"
    G._append_rows(path, [dict(unit="u1", unit_rows=2, **UNIT, seed=s, perplexity=1.5) for s in (0, 1)])
    G._append_rows(path, [dict(unit="u2", unit_rows=1, **UNIT, seed=0, perplexity=2.5)])
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"perplexity": 1.5', '"perplexity": 1.6')  # valid JSON, one digit changed
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="saealign.grid"):
        assert [r["unit"] for r in read_rows(path)] == ["u1", "u2"]
    assert "line" in caplog.text and "[3]" in caplog.text
    assert G._complete_units(path) == {"u2"}
    assert [json.loads(l).get("unit") for l in path.read_text().splitlines()] == [None, "u2"]  # u1 runs again
    path.write_text(path.read_text() + '{"topic": "t"}\n')  # a line that is not a grid row at all
    with pytest.raises(ValueError, match=r"line 3: not a grid row"):
        read_rows(path)


def test_grid_units_name_their_methods_and_refuse_unknown_ones():
    assert grid_units(["t"], ("Original", "FT", "Swap"), ("a", "b"), ("error",)) == [
        ("t", "Original", "", ""), ("t", "FT", "", ""), ("t", "Swap", "a", "error"), ("t", "Swap", "b", "error")]
    with pytest.raises(ValueError, match=r"unknown methods \['Boost'\]"):
        grid_units(["t"], ("Swap", "Boost"))


def test_unit_key_is_unchanged():
    "The digest of a unit and its settings, as main computed it: committed grids keep resuming."
    assert (unit_key(("sea-20", "Swap", "blocks.2.hook_resid_post", "error"), {"seeds": [0, 1], "max_new_tokens": 64})
            == "d947aafbe261282d4b9231e8616c8cfc49a5d435453ae9a7a1ea62f51e9b35a8")


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_grid_reads_and_resumes_complete(path, tmp_path):
    rows = read_rows(path)
    n_lines = len(path.read_text().splitlines())
    assert len(rows) == n_lines - 1 and len(rows) > 300
    assert {"unit", "topic", "method", "prompt", "seed", "continuation", "centroid_cosine"} <= set(rows[0])
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    # resuming finds every unit complete: nothing would run again (a format-2 file is sealed on the way)
    assert G._complete_units(copy) == {r["unit"] for r in rows}
    assert [r["continuation"] for r in read_rows(copy)] == [r["continuation"] for r in rows]


# --- runs on stories260K ----------------------------------------------------------------------------

@pytest.fixture
def tiny_grid(model, sae, embedder, ref):
    sae_id = sae.cfg.metadata.hook_name
    return dict(model=model, embedder=embedder, saes={sae_id: sae}, references={sae_id: ref},
                topics={"sea": STORY_TOPICS["sea"][:6]}, prompts={"Once upon a time": "neutral"}, seeds=(0,),
                methods=("Original", "Clamp"), outputs=("error",), max_new_tokens=8, progress=False)


def test_grid_units_are_keyed_by_every_setting(tmp_path, tiny_grid):
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
    path = tmp_path / "grid.jsonl"
    run_grid(path, **tiny_grid)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        run_grid(path, **{**tiny_grid, **change})
    with pytest.raises(ValueError, match=match):
        run_grid(tmp_path / "new.jsonl", **{**tiny_grid, **change})
    assert path.read_bytes() == before and not (tmp_path / "new.jsonl").exists()


def test_unit_keys_of_a_tiny_grid_are_mains(tmp_path, tiny_grid):
    "Every setting behind a unit goes into its key exactly as main's code put it (the keys main computed)."
    rows = run_grid(tmp_path / "grid.jsonl", **tiny_grid)
    assert dict(zip(rows.method, rows.unit)) == {
        "Original": "bbbc4b8e7ff7ba0bfefa0e0546d8b13a913d4a01f8728f300b5c9f04cf8a3526",
        "Clamp": "eb4955786e9e0614945133463f4db29889571a9b19fa589726baec549db7ce23"}


def _edit_line(path, number, edit):
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1], lines)
    path.write_text("\n".join(lines) + "\n")


def _with(key, value):
    return lambda line, lines: json.dumps({**json.loads(line), key: value})


@pytest.mark.parametrize("edit", [
    lambda line, lines: re.sub(r'("perplexity": \d+\.)(\d)', lambda m: m[1] + str((int(m[2]) + 1) % 10), line),
    _with("continuation", " an edited continuation"),
    _with("unit_rows", 1),
    lambda line, lines: lines[2]],  # line 3 copied over line 2: valid, but its unit repeats a row and lacks one
    ids=["one digit", "valid JSON", "unit_rows", "a row repeated"])
def test_edited_grid_row_runs_its_unit_again(tmp_path, tiny_grid, caplog, edit):
    grid = {**tiny_grid, "seeds": (0, 1)}
    path = tmp_path / "grid.jsonl"
    first = run_grid(path, **grid)
    assert len(first) == 4 and first.unit.nunique() == 2
    _edit_line(path, 2, edit)
    with caplog.at_level(logging.WARNING, logger="saealign.grid"):
        again = run_grid(path, **grid)
    assert "running" in caplog.text and "again" in caplog.text
    key = ["unit", "seed", "continuation", "perplexity"]
    assert again.sort_values(key)[key].values.tolist() == first.sort_values(key)[key].values.tolist()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saealign.grid"):
        assert len(read_rows(path)) == 4 and len(run_grid(path, **grid)) == 4
    assert not caplog.text  # the file is whole again


def test_grid_of_format_2_is_read_and_sealed_on_resume(tmp_path, tiny_grid, monkeypatch):
    path = tmp_path / "grid.jsonl"
    first = run_grid(path, **tiny_grid)
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("unit_row", "row_sha256")}
            for line in path.read_text().splitlines()[1:]]
    path.write_text("".join(json.dumps(r) + "\n" for r in [G.LEGACY_HEADER, *rows]))  # as the repository's results
    assert [r["continuation"] for r in read_rows(path)] == first.continuation.tolist()
    monkeypatch.setattr(G, "_run_unit", lambda *a, **k: pytest.fail("a unit of the legacy file was run again"))
    assert run_grid(path, **tiny_grid).continuation.tolist() == first.continuation.tolist()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == G.GRID_HEADER and all(G.row_digest(json.loads(l)) == json.loads(l)["row_sha256"]
                                                         for l in lines[1:])


def test_grid_measures_reference_means_once_for_all_topics(model, sae, embedder, monkeypatch, tmp_path):
    """They depend only on the SAE: two topics running DiffMeans measure the reference once, each topic's texts once;
    a second grid finds both on disk (`reference_means`, `text_means`)."""
    import saealign.additive as additive
    ref = ReferenceSet.from_summaries(torch.eye(sae.cfg.d_sae)[:40] + 0.01, torch.nn.functional.normalize(
        torch.randn(40, 384, generator=torch.Generator().manual_seed(0)), dim=1), prompts=[f"A story {i}." for i in range(40)])
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))  # nothing measured before, in memory or on disk
    measured, real = [], additive.activation_means
    monkeypatch.setattr(additive, "activation_means", lambda m, s, texts, **kw: measured.append(list(texts)) or real(m, s, texts, **kw))
    sae_id = sae.cfg.metadata.hook_name
    topics = {"sea": STORY_TOPICS["sea"][:3], "food": STORY_TOPICS["food"][:3]}
    rows = run_grid(tmp_path / "grid.jsonl", model=model, embedder=embedder, saes={sae_id: sae}, references={sae_id: ref},
                    topics=topics, prompts={"Once upon a time": "neutral"}, seeds=(0,), methods=("DiffMeans",),
                    outputs=("error",), max_new_tokens=4, progress=False)
    assert len(rows) == 2
    as_sets = lambda lists: sorted(tuple(sorted(t)) for t in lists)
    assert as_sets(measured) == as_sets([topics["sea"], topics["food"], ref.prompts])
    measured.clear()
    run_grid(tmp_path / "other.jsonl", model=model, embedder=embedder, saes={sae_id: sae}, references={sae_id: ref},
             topics={"sea": topics["sea"]}, prompts={"Once upon a time": "neutral"}, seeds=(0,), methods=("DiffMeans",),
             outputs=("error",), max_new_tokens=4, progress=False)
    assert measured == []
