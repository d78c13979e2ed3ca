import json
import os
import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from conftest import SHARED, needs_mirror
from saealign import core as assets
from saealign.core import ENV_VAR, HubUnreachableError, assets_dir, hub_dataset, hub_file, load_texts

ROWS = {  # the mirror README's table
    ("p3", None): 55_185, ("ibm_reference", None): 150, ("wiki_medical_terms", None): 20,
    ("medquad", None): 3_816, ("medquad", "qa"): 16_407, ("pubmedqa", None): 1_000,
    ("awesome_chatgpt_prompts", None): 211, ("sycophancy", "generate"): 1_000,
    ("sycophancy", "test_ab"): 50, ("sycophancy", "test_open_ended"): 53, ("amazon", None): 200,
    ("cola", "in_domain_train"): 8_551, ("cola", "in_domain_dev"): 527, ("cola", "out_of_domain_dev"): 516,
    ("instructions", "seed_tasks"): 175, ("instructions", "user_oriented_instructions"): 252,
}


@pytest.fixture
def no_mirror(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def dead_hub(no_mirror, monkeypatch):
    # a closed local port: the hub is unreachable whatever this machine's network is
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")


@needs_mirror
@pytest.mark.parametrize("name,split", list(ROWS))
def test_every_source_loads_from_mirror(mirror, name, split):
    ds = load_texts(name, split=split)
    assert ds.num_rows == ROWS[name, split]
    assert ds.column_names[0] == "text"
    assert all(isinstance(t, str) and t.strip() for t in ds["text"])


@needs_mirror
def test_source_fields(mirror):
    p3 = load_texts("p3")
    assert {"template", "completion"} <= set(p3.column_names)
    assert not any(c.endswith("<|endoftext|>") for c in p3["completion"][:1000])
    assert set(assets.P3_HUB_CONFIGS) <= set(p3["template"])  # the hub list names real P3 configs
    assert load_texts("awesome_chatgpt_prompts").column_names == ["text", "act"]
    # the malformed row (space before its quote) is read as one prompt, not split at commas
    assert not any(t.startswith('"') for t in load_texts("awesome_chatgpt_prompts")["text"])
    cola = load_texts("cola")
    assert set(cola["label"]) == {0, 1} and 'Susan whispered "Shut up".' in cola["text"]
    pq = load_texts("pubmedqa")
    assert pq[0]["text"].endswith("?") and isinstance(pq[0]["pubid"], int) and pq[0]["contexts"]
    assert "term" in load_texts("medquad").column_names


@needs_mirror
def test_sycophancy_text_as_paper_code_builds_it(mirror):
    item = json.loads((SHARED / "data/sycophancy/generate_dataset.json").read_text())[0]
    row = load_texts("sycophancy")[0]
    stem, choice_a = item["question"].split("\n")[0], item["question"].split("\n")[-2]
    assert item["answer_matching_behavior"] == "(A)" and row["answer_matching_behavior"] == "(A)"
    assert row["text"] == stem + ":" + choice_a.replace(" (A) ", "")
    assert "(A)" not in row["text"] and "(B)" not in row["text"]


def test_unknown_name_and_split(mirror):
    with pytest.raises(ValueError, match="valid names: p3, ibm_reference"):
        load_texts("nope")
    with pytest.raises(ValueError, match="valid splits: generate, test_ab, test_open_ended"):
        load_texts("sycophancy", split="train")


def test_assets_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert assets_dir() is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert assets_dir() == tmp_path
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a directory"):
        assets_dir()


@needs_mirror
def test_hub_file_from_mirror(mirror):
    path = hub_file("karpathy/tinyllamas", "stories260K/stories260K.bin", "models/stories260K/stories260K.bin")
    assert path.stat().st_size > 1_000_000


def test_empty_mirror_names_file_id_and_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        hub_file("karpathy/tinyllamas", "stories260K/tok512.bin", "models/stories260K/tok512.bin")
    for part in ("models/stories260K/tok512.bin", "karpathy/tinyllamas", "stories260K/tok512.bin", ENV_VAR):
        assert part in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        load_texts("pubmedqa")
    for part in ("data/medical/pubmedqa_pqal.json", "qiaojin/PubMedQA", ENV_VAR):
        assert part in str(e.value)


@pytest.mark.parametrize("name", ["ibm_reference", "sycophancy", "medquad", "instructions"])
def test_github_sources_need_the_mirror(no_mirror, name):
    with pytest.raises(FileNotFoundError, match=ENV_VAR) as e:
        load_texts(name)
    assert "GitHub repository" in str(e.value) and assets.TEXT_SOURCES[name].files[
        next(iter(assets.TEXT_SOURCES[name].files))] in str(e.value)


@pytest.mark.parametrize("call,hub_id", [
    (lambda: hub_file("saealign-test/no-such-repo", "config.json", "models/x/config.json"), "saealign-test/no-such-repo"),
    (lambda: hub_dataset("saealign-test/no-such-dataset", split="train"), "saealign-test/no-such-dataset"),
    (lambda: load_texts("pubmedqa"), "qiaojin/PubMedQA"),
    (lambda: load_texts("p3"), "bigscience/P3"),
])
def test_unreachable_hub_fails_fast_and_clearly(dead_hub, call, hub_id):
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match=ENV_VAR) as e:
        call()
    assert time.perf_counter() - start < 5
    assert hub_id in str(e.value)


def test_unreachable_hub_still_serves_the_hf_cache(dead_hub, monkeypatch, tmp_path):
    # a cache entry laid out as huggingface_hub writes it: refs/main -> snapshot folder
    repo = tmp_path / "models--saealign-test--cached"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    path = hub_file("saealign-test/cached", "config.json", "unused")
    assert path.read_text() == "{}"


@pytest.fixture(params=["silent", "503"])
def broken_hub(request, no_mirror, monkeypatch):
    "A local endpoint that accepts connections and then never answers, or answers 503 (a hub outage)."
    import socket
    import threading
    server = socket.create_server(("127.0.0.1", 0))
    conns = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conns.append(conn)
            if request.param == "503":
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    server.close()
    for conn in conns:
        conn.close()


def test_hung_or_failing_hub_fails_within_the_probe_timeout(broken_hub):
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="saealign-test/no-such-repo"):
        hub_file("saealign-test/no-such-repo", "config.json", "models/x/config.json")
    assert time.perf_counter() - start < assets.PROBE_TIMEOUT_S + 2


def test_the_gemma_training_corpus_without_a_mirror_says_what_is_missing(no_mirror, monkeypatch):
    "Every corpus source goes through load_texts: no mirror means a FileNotFoundError naming the variable, not a TypeError."
    import datasets
    from saealign import corpus
    from saealign.training import GEMMA_RECIPE
    real = corpus.load_texts
    monkeypatch.setattr(corpus, "load_texts", lambda name, **k: real(name, **k) if name == "instructions"
                        else datasets.Dataset.from_dict({"text": ["a text"]}))
    with pytest.raises(FileNotFoundError, match=f"self-instruct.*{ENV_VAR}"):
        corpus.corpus_documents(GEMMA_RECIPE.corpus)
