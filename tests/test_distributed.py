"""The Ray engine of the reference pass on a local Ray instance (2 CPU workers) and stories260K: the merged
result equals the single-process one exactly, a worker killed mid-run and a driver stopped halfway both end
identical, and either engine reuses the other's cache."""
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import ray  # the ray extra: make's dev install puts it in the venv
import torch

from saealign import distributed as D
from saealign import reference as R
from saealign.distributed import RAY_INSTALL, Recipe, compute_reference_ray
from saealign.reference import compute_reference

MAX_TOKENS, CHUNK, BATCH = 24, 8, 4  # 21 prompts: chunks of 8, 8 and 5, two batches per full chunk
RUN = dict(max_tokens=MAX_TOKENS, chunk_size=CHUNK, batch_size=BATCH)
STORIES = Recipe("stories260K")  # the conftest fixtures' model, SAE and embedder


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False)
    # the loaders below are defined here, a module the workers cannot import: ship them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(padded_prompts):
    return padded_prompts


@pytest.fixture(scope="module")
def loaded():
    """The single-process side's model, SAE and embedder, built from the recipe as each worker builds its own: these
    tests compare the two engines, not whatever earlier tests left in the session's shared objects."""
    return STORIES.load()


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def sae(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def embedder(loaded):
    return loaded[2]


@pytest.fixture(scope="module")
def base(model, sae, embedder, prompts):
    "The single-process pass, with one torch thread as each actor (num_cpus=1) has: same threads, same floats."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute_reference(model, sae, prompts, embedder, progress=False, **RUN)
    finally:
        torch.set_num_threads(threads)


class Bar:
    "Stands in for tqdm: records every update, and raises Stopped at update number `stop_at` (the driver dies)."
    def __init__(self, updates, stop_at=None):
        self.updates, self.stop_at = updates, stop_at

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.updates.append(n)
        if len(self.updates) == self.stop_at:
            raise Stopped


class Stopped(Exception):
    pass


def assert_same(ref, base):
    # meta first: on a mismatch it names the part (weights, embedder, settings) that the fingerprint only hashes
    assert ref.meta == base.meta and ref.prompts == base.prompts and ref.fingerprint == base.fingerprint
    assert torch.equal(ref.summaries.to_dense(), base.summaries.to_dense())
    assert torch.equal(ref.prompt_counts, base.prompt_counts) and torch.equal(ref.token_counts, base.token_counts)
    assert torch.equal(ref.embeddings, base.embeddings)


def chunk_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("chunk_*.safetensors"))


@pytest.fixture(scope="module")
def ray_run(ray_local, prompts, tmp_path_factory):
    "One Ray pass into a fresh chunk cache and a fresh embeddings cache, its progress updates recorded."
    tmp, updates = tmp_path_factory.mktemp("ray-run"), []
    real = D.tqdm
    D.tqdm = Bar(updates)
    try:
        ref = compute_reference_ray(STORIES, prompts, workers=2, cache_dir=tmp / "reference",
                                    embedding_cache=tmp / "embeddings", **RUN)
    finally:
        D.tqdm = real
    return ref, tmp, updates


def test_ray_pass_equals_single_process(ray_run, base, prompts):
    ref, tmp, updates = ray_run
    assert_same(ref, base)
    # the driver's bar: nothing reused, then each chunk's prompts once, as each chunk arrived
    assert updates[0] == 0 and sorted(updates[1:]) == [5, 8, 8]
    assert chunk_files(tmp / "reference") == [f"chunk_{i:05d}.safetensors" for i in range(3)]
    assert json.loads((tmp / "reference" / "manifest.json").read_text())["fingerprint"] == base.fingerprint
    assert len(list((tmp / "embeddings").glob("*.safetensors"))) == 3  # the actors embedded, and fed the cache


def test_single_process_reuses_the_ray_cache(ray_run, model, sae, embedder, base, prompts, monkeypatch):
    _, tmp, _ = ray_run
    real, calls = R.compute_chunk, []
    monkeypatch.setattr(R, "compute_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = compute_reference(model, sae, prompts, embedder, cache_dir=tmp / "reference", embedding_cache=False,
                              progress=False, **RUN)
    assert calls == [] and again.fingerprint == base.fingerprint
    assert torch.equal(again.summaries.to_dense(), base.summaries.to_dense())


def test_ray_reuses_the_single_process_cache(ray_local, model, sae, embedder, base, prompts, tmp_path, monkeypatch,
                                             caplog):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `base` and every actor: the floats of one thread
    try:
        compute_reference(model, sae, prompts, embedder, cache_dir=tmp_path, embedding_cache=False, progress=False, **RUN)
    finally:
        torch.set_num_threads(threads)
    updates = []
    monkeypatch.setattr(D, "tqdm", Bar(updates))
    with caplog.at_level(logging.INFO, logger="saealign.distributed"):
        ref = compute_reference_ray(STORIES, prompts, cache_dir=tmp_path, embedding_cache=False, **RUN)
    assert "computing" not in caplog.text and updates == [len(prompts)]  # every chunk from the cache, no actor
    assert_same(ref, base)


def dies_once(folder, device):
    """stories260K's recipe, with a hook that ends its process (os._exit, as a segfault or the OOM killer would) at
    the 4th batched forward pass of the run, in whichever actor makes it: once, the marker file says."""
    model, sae, embedder = STORIES.load(device)
    folder = Path(folder)

    def hook(module, args):
        if args[0].shape[1] == 1:  # check_sae_fits' one-token probe, not a batch of prompts
            return
        n = len(list(folder.glob("forward_*")))
        (folder / f"forward_{n}_{os.getpid()}").touch()
        if n == 3:
            try:
                os.close(os.open(folder / "killed", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)

    model.blocks[0].register_forward_pre_hook(hook)
    return model, sae, embedder


def test_worker_killed_mid_run_ends_identical(ray_local, base, prompts, tmp_path, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    updates = []
    monkeypatch.setattr(D, "tqdm", Bar(updates))
    ref = compute_reference_ray(Recipe(loader=partial(dies_once, str(marks))), prompts, workers=2,
                                cache_dir=tmp_path / "reference", embedding_cache=False, **RUN)
    assert (marks / "killed").exists()  # a worker did die mid-run
    killed_pid = next(p.name.split("_")[2] for p in marks.glob("forward_3_*"))
    assert any(p.name.split("_")[2] != killed_pid for p in marks.glob("forward_*"))  # others finished the run
    assert_same(ref, base)
    assert sorted(updates[1:]) == [5, 8, 8]  # the retried chunk's rows arrived once
    assert chunk_files(tmp_path / "reference") == [f"chunk_{i:05d}.safetensors" for i in range(3)]


def test_driver_restart_reuses_finished_chunks(ray_local, base, prompts, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "reference"
    # the driver dies as it counts the second chunk that arrived: after writing it (update 1 counts the reused)
    monkeypatch.setattr(D, "tqdm", Bar([], stop_at=3))
    with pytest.raises(Stopped):
        compute_reference_ray(STORIES, prompts, cache_dir=cache, embedding_cache=False, **RUN)
    done = chunk_files(cache)
    assert len(done) == 2 and not list(cache.glob("*.tmp"))
    assert json.loads((cache / "manifest.json").read_text())["fingerprint"] == base.fingerprint
    stamps = {name: (cache / name).stat().st_mtime_ns for name in done}

    updates = []
    monkeypatch.setattr(D, "tqdm", Bar(updates))
    with caplog.at_level(logging.INFO, logger="saealign.distributed"):
        ref = compute_reference_ray(STORIES, prompts, cache_dir=cache, embedding_cache=False, **RUN)
    assert "computing 1 of 3 chunks" in caplog.text  # only the chunk that never reached the driver
    assert {name: (cache / name).stat().st_mtime_ns for name in done} == stamps  # the others were not rewritten
    assert sum(updates) == len(prompts) and len(updates) == 2
    assert_same(ref, base)


def other_sae_in_actors(device):
    "stories260K's recipe, except that in an actor (not in the planning task) one SAE weight differs."
    model, sae, embedder = Recipe("stories260K", embedder=False).load(device)
    if ray.get_runtime_context().get_actor_id() is not None:
        with torch.no_grad():
            sae.W_enc[0, 0] += 1.0
    return model, sae, embedder


def test_worker_with_other_weights_stops_the_pass(ray_local, prompts, tmp_path):
    with pytest.raises(Exception, match="built a different model, SAE or embedder.*sae_weights differ"):
        compute_reference_ray(Recipe(loader=other_sae_in_actors), prompts, cache_dir=tmp_path, progress=False,
                              **RUN)
    assert chunk_files(tmp_path) == []


def test_bad_inputs_refused_before_any_work():
    with pytest.raises(ValueError, match="single string"):
        compute_reference_ray(STORIES, "Once upon a time")
    with pytest.raises(ValueError, match="workers must be a positive int"):
        compute_reference_ray(STORIES, ["Once upon a time"], workers=0)


def test_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    with pytest.raises(ImportError, match=RAY_INSTALL.replace("[", r"\[").replace("]", r"\]")):
        compute_reference_ray(STORIES, ["Once upon a time"])
