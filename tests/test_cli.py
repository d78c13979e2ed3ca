"""The console script as users run it: a fresh process, exit status, the report file."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_mirror
from saealign.calibration import DEFAULT_METHOD

SCRIPT = Path(sys.executable).with_name("saealign")


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@needs_mirror
def test_demo_writes_a_self_contained_report(tmp_path):
    done = run(["demo", "--model", "stories260K", "--max-new-tokens", "24", "--report", "out.html"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{DEFAULT_METHOD} (error), contamination" in done.stdout and "per-token contamination" in done.stdout
    page = (tmp_path / "out.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 2 and "<script" not in page
    assert "<th>output score</th>" not in page  # the calibrated default measures no output scores
    # the highlighting: per-token numbers printed, and a page with the script-free colour toggle
    assert "percentile (with its neighbours) among reference tokens" in done.stdout and "pctl" in done.stdout
    assert page.count('<input type="radio" class="sa-mode') == 3 and " checked>" in page
    assert page.count('class="sa-tok"') == page.count("--sa-attribution:") > 24


@needs_mirror
def test_align_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "topic.txt").write_text("")
    done = run(["align", "--topic-file", "topic.txt", "--prompt", "Once"], tmp_path)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "holds no alignment texts" in done.stderr and not (tmp_path / "saealign-report.html").exists()


def test_unknown_subcommand_is_a_usage_error(tmp_path):
    done = run(["frobnicate"], tmp_path)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_train_saes_runs_the_models_recipe(monkeypatch, tmp_path):
    "`train-saes` hands the model's recipe to the one training path; a model without a recipe is a usage error."
    import pytest
    from saealign import training
    from saealign.cli import main
    calls = []
    monkeypatch.setattr(training, "train_and_ship", lambda recipe, dest=None: calls.append((recipe, dest)))
    assert main(["train-saes", "--model", "stories260K", "--out", str(tmp_path)]) == 0
    assert main(["train-saes"]) == 0
    assert calls == [(training.STORIES_RECIPE, str(tmp_path)), (training.GEMMA_RECIPE, None)]
    with pytest.raises(SystemExit):
        main(["train-saes", "--model", "gpt2-small-random"])


def test_the_baselines_are_not_offered_to_steer_or_export(capsys):
    "`align` and `export` steer through an SAE: a baseline (the model as it is, a prompt) is a usage error, said at once."
    import pytest
    from saealign.cli import main, steering_methods
    from saealign.registry import method_names, method_needs_sae
    assert set(steering_methods()) == {m for m in method_names() if method_needs_sae(m)} and "Original" not in steering_methods()
    for command in (["align", "--prompt", "Once", "--method", "PromptingWords"], ["export", "--method", "Original"]):
        with pytest.raises(SystemExit) as stopped:
            main(command)
        assert stopped.value.code == 2 and "invalid choice" in capsys.readouterr().err
