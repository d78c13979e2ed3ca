"""SAE training: the recipes' sae_lens runner settings (the values the shipped SAEs were trained with, worked out by
hand), the stories corpus its shipped SAEs were trained on, recipes through JSON, the checkpoint format, and a tiny
run that resumes from its checkpoint."""
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saealign import training as T
from saealign.activations import special_ids
from saealign.core import DamagedFileError, load_tensors, load_texts


def test_stories_recipe_settings(model, tmp_path):
    recipe = replace(T.STORIES_RECIPE, schedule=replace(T.STORIES_RECIPE.schedule, training_tokens=1_000_000, seed=3))
    s = T.runner_config(model, recipe, tmp_path)
    # 244 steps: warm-up 12, decay 48, dead after 24 steps, sampling window 61; buffer max(16, ceil(8192 / 8192))
    assert (s.model_name, s.context_size, s.lr_warm_up_steps, s.lr_decay_steps) == ("stories260K", 256, 12, 48)
    assert (s.dead_feature_window, s.feature_sampling_window, s.n_batches_in_buffer) == (24, 61, 16)
    assert s.exclude_special_tokens == special_ids(model) and s.seed == 3 and s.checkpoint_path is None
    assert all(c.normalize_activations == "none" and c.k == 16 for c in s.saes.values())


def test_gemma_recipe_settings_come_from_the_same_place(model, tmp_path):
    cfg = T.runner_config(model, T.GEMMA_RECIPE, tmp_path, resume=tmp_path / "7")
    # 1,048,576 tokens in batches of 1,024: 1,024 steps; warm-up 51, decay 204, dead after 97 steps, sampling window 256
    assert (cfg.model_name, cfg.context_size, cfg.lr_warm_up_steps, cfg.lr_decay_steps) == ("google/gemma-3-270m", 128, 51, 204)
    assert (cfg.dead_feature_window, cfg.feature_sampling_window, cfg.eval_batch_size_prompts) == (97, 256, 8)
    assert cfg.checkpoint_path == str(tmp_path / "checkpoints") and cfg.resume_from_checkpoint == str(tmp_path / "7")
    assert set(cfg.saes) == {n for n, s in T.GEMMA_RECIPE.specs.items() if not s.warm_start}
    assert cfg.exclude_special_tokens == special_ids(model)
    warm = T.runner_config(model, T.GEMMA_RECIPE, tmp_path, warm=True)
    # the warm run: 262,144 tokens, 256 steps at 5e-4; the JumpReLU's L0 penalty warms up over 25 steps
    assert (warm.lr, warm.lr_warm_up_steps, warm.lr_decay_steps) == (5e-4, 12, 51)
    assert [(c.architecture(), c.l0_warm_up_steps, c.target_l0) for c in warm.saes.values()] == [("jumprelu", 25, 32)]
    stories = T.runner_config(model, T.STORIES_RECIPE, tmp_path)
    shared = ("dataset_path", "streaming", "prepend_bos", "store_batch_size_prompts", "n_eval_batches", "device")
    assert all(getattr(cfg, k) == getattr(stories, k) for k in shared)


@pytest.mark.parametrize("name", sorted(T.RECIPES))
def test_a_recipe_goes_through_json_unchanged(name):
    recipe = T.RECIPES[name]
    assert T.Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert T.recipe_for(recipe.model) is recipe


def test_the_stories_recipe_is_the_corpus_its_shipped_saes_were_trained_on(model, monkeypatch):
    "4,096 stories, 512 P3 rows, 512 CoLA rows in an order of their own; held out: 48 + 8 + 8 rows, P3 from text 50,000."
    from saealign import corpus as C
    written = []
    monkeypatch.setattr(C, "written_rows", lambda model, n, length, seed: written.append((n, seed)) or
                        torch.full((n, length), model.tokenizer.bos_token_id))
    corpus = T.STORIES_RECIPE.corpus
    _, sources = C.corpus_rows(model, corpus, corpus.rows, with_sources=True)
    made = ["written"] * 4096 + ["p3"] * 512 + ["cola"] * 512
    assert sources == [made[i] for i in torch.randperm(5120, generator=torch.Generator().manual_seed(0)).tolist()]
    _, held = C.corpus_rows(model, corpus, 64, split="heldout", with_sources=True)
    assert Counter(held) == {"written": 48, "p3": 8, "cola": 8} and written == [(4096, 0), (48, 10_000)]
    assert C.corpus_documents(corpus, "heldout")["p3"] == list(load_texts("p3")["text"])[50_000:]


def test_a_run_folder_refuses_another_recipe(tmp_path):
    T._record_recipe(tmp_path, T.STORIES_RECIPE)
    T._record_recipe(tmp_path, T.STORIES_RECIPE)  # the same recipe: resumes
    with pytest.raises(ValueError, match="holds a run of another recipe"):
        T._record_recipe(tmp_path, replace(T.STORIES_RECIPE, schedule=replace(T.STORIES_RECIPE.schedule, lr=1e-3)))


def _flip_last_bytes(path: Path, back: int = 3):
    data = bytearray(path.read_bytes())
    data[-back] ^= 1
    path.write_bytes(bytes(data))


def test_trainer_state_round_trip_damage_and_the_unchecked_format(tmp_path):
    state = {"optimizer": {"state": {0: {"exp_avg": torch.arange(3.0)}}, "param_groups": [{"betas": (0.9, 0.99)}]},
             "n_training_steps": 7, "flag": False}
    path = T.save_state(state, tmp_path / T.TRAINER_STATE)
    back = T.load_state(path)
    assert back["n_training_steps"] == 7 and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left
    _flip_last_bytes(path)
    with pytest.raises(DamagedFileError, match="do not match the sha256"):
        T.load_state(path)
    # a checkpoint written before the checksums: JSON skeleton beside plain safetensors
    old = tmp_path / "old" / T.TRAINER_STATE
    old.parent.mkdir()
    tensors = {}
    skeleton = T._split_state(state, "s", tensors)
    save_file(tensors, old)
    old.with_suffix(".json").write_text(json.dumps(skeleton))
    assert T.load_state(old)["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def test_a_tiny_sae_saves_reads_back_and_refuses_damage(tmp_path):
    from saealign.saes import random_sae
    sae = random_sae("topk", d_in=4, d_sae=6, k=2, hook_name="blocks.0.hook_resid_post")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4, 6)); sae.b_enc.zero_(); sae.b_dec.zero_()
    back = T.save_inference_sae(sae, tmp_path / "tiny")
    with torch.no_grad():  # the two largest inputs, on their own latents
        assert torch.equal(back.encode(torch.tensor([[3.0, 1.0, 2.0, 0.0]])), torch.tensor([[3.0, 0, 2.0, 0, 0, 0]]))
    T.save_inference_sae(sae, tmp_path / "half", half=("W_dec",))
    stored, _ = load_tensors(tmp_path / "half" / "sae_weights.safetensors")
    assert stored["W_dec"].dtype == torch.float16 and stored["W_enc"].dtype == torch.float32
    _flip_last_bytes(tmp_path / "tiny" / "sae_weights.safetensors", back=5)
    with pytest.raises(DamagedFileError, match="do not match the sha256"):
        T.read_run_sae(tmp_path / "tiny")
    sae.save_model(tmp_path / "unchecked")  # as a run wrote its SAEs before the checksums
    assert torch.equal(T.read_run_sae(tmp_path / "unchecked").W_enc, sae.W_enc)


def test_a_tiny_run_resumes_from_its_checkpoint(model, tmp_path, monkeypatch):
    recipe = replace(T.STORIES_RECIPE, specs={"tiny": T.SAESpec(layer=1, d_sae=32, k=4, normalize_activations="none")},
                     corpus=replace(T.STORIES_RECIPE.corpus, context=32, written_share=0.0, heldout_written_share=None,
                                    rows=None),
                     schedule=T.Schedule(training_tokens=16_384, batch_tokens=512, lr=3e-3, n_checkpoints=1))
    first = T.train_saes(model, recipe, tmp_path / "first")["tiny"]
    (checkpoint,) = (tmp_path / "first" / "checkpoints").iterdir()
    shutil.copytree(tmp_path / "first", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "tiny")  # as if stopped after the checkpoint
    loaded = []
    real = T.load_state
    monkeypatch.setattr(T, "load_state", lambda path: loaded.append(Path(path)) or real(path))
    resumed = T.train_saes(model, recipe, tmp_path / "resumed")["tiny"]
    assert loaded == [tmp_path / "resumed" / "checkpoints" / checkpoint.name / "tiny" / T.TRAINER_STATE]
    halfway = T.inference_from_checkpoint(tmp_path / "resumed" / "checkpoints" / checkpoint.name, "tiny", tmp_path / "half")
    # the resumed run went on from the checkpoint's weights to where the whole run went
    assert (resumed.W_dec - first.W_dec).norm() < (halfway.W_dec - first.W_dec).norm()
    shipped = T.ship_saes(recipe, tmp_path / "resumed", tmp_path / "dest")
    assert shipped == [tmp_path / "dest" / "tiny"] and torch.equal(T.read_run_sae(shipped[0]).W_dec, resumed.W_dec)
    _flip_last_bytes(T.latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "tiny" / T.TRAINER_STATE)
    shutil.rmtree(tmp_path / "resumed" / "tiny")
    monkeypatch.setattr(T, "load_state", real)
    with pytest.raises(DamagedFileError, match="delete the checkpoint"):
        T.train_saes(model, recipe, tmp_path / "resumed")
