"""The training recipes' sae_lens runner settings: both models' runs built by `embedded.runner_settings`, with the
values the shipped SAEs were trained with (worked out by hand from the recipes)."""
from pathlib import Path

import datasets

from saealign import embedded, gemma_saes
from saealign.activations import special_ids


def test_stories_recipe_settings(model):
    corpus = datasets.Dataset.from_dict({"input_ids": [[1] * 256] * 2})
    s = embedded.runner_settings(model, **embedded._stories_settings(
        corpus, training_tokens=1_000_000, seed=3, lr=3e-3, batch_tokens=4096, dead_window_tokens=100_000, output_path=None))
    # 244 steps: warm-up 12, decay 48, dead after 24 steps, sampling window 61; buffer max(16, ceil(8192 / 8192))
    assert (s["model_name"], s["context_size"], s["lr_warm_up_steps"], s["lr_decay_steps"]) == ("stories260K", 256, 12, 48)
    assert (s["dead_feature_window"], s["feature_sampling_window"], s["n_batches_in_buffer"]) == (24, 61, 16)
    assert s["exclude_special_tokens"] == special_ids(model) and s["seed"] == 3 and s["checkpoint_path"] is None


def test_gemma_recipe_settings_come_from_the_same_place(model, tmp_path):
    specs = {n: sp for n, sp in gemma_saes.GEMMA_SPECS.items() if not sp.get("warm_start")}
    cfg = gemma_saes._runner_config(specs, model, tmp_path, n_checkpoints=16, resume=tmp_path / "7",
                                    **gemma_saes.GEMMA_TRAINING)
    # 1,048,576 tokens in batches of 1,024: 1,024 steps; warm-up 51, decay 204, dead after 97 steps, sampling window 256
    assert (cfg.model_name, cfg.context_size, cfg.lr_warm_up_steps, cfg.lr_decay_steps) == ("google/gemma-3-270m", 128, 51, 204)
    assert (cfg.dead_feature_window, cfg.feature_sampling_window, cfg.eval_batch_size_prompts) == (97, 256, 8)
    assert cfg.checkpoint_path == str(tmp_path / "checkpoints") and cfg.resume_from_checkpoint == str(tmp_path / "7")
    assert set(cfg.saes) == set(specs) and cfg.exclude_special_tokens == special_ids(model)
    shared = embedded.runner_settings(model, model_name="google/gemma-3-270m", context=128, training_tokens=1_048_576,
                                      batch_tokens=1024, lr=2e-3, seed=0, eval_batch_prompts=8)
    assert all(getattr(cfg, k) == v for k, v in shared.items()
               if k not in ("logger", "checkpoint_path", "n_checkpoints", "resume_from_checkpoint"))
