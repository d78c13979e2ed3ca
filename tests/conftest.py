import os
import warnings
from pathlib import Path

import pytest

# The asset mirror: the variable as set, else a shared/ folder beside the checkout.
SHARED = Path(os.environ.get("SAEALIGN_ASSETS") or Path(__file__).resolve().parents[2] / "shared")
HAS_MIRROR = (SHARED / "models").is_dir()
needs_mirror = pytest.mark.skipif(not HAS_MIRROR, reason="no asset mirror: set SAEALIGN_ASSETS")


@pytest.fixture
def mirror(monkeypatch):
    monkeypatch.setenv("SAEALIGN_ASSETS", str(SHARED))
    return SHARED


@pytest.fixture(scope="session")
def stories():
    "stories260K, shared by every test module (loading it is cheap, but not free)."
    if not HAS_MIRROR:
        pytest.skip("no asset mirror: set SAEALIGN_ASSETS")
    from saealign.models import load_model
    from saealign.core import _model_description
    model = load_model("stories260K")
    loaded = _model_description(model)
    yield model
    # a test that changed the shared model (weights, config, tokenizer) would skew every later one: say so
    if (now := _model_description(model)) != loaded:
        changed = sorted(k for k in loaded if loaded[k] != now[k])
        warnings.warn(f"a test changed the session's stories260K model: {changed} differ from the loaded model's")


@pytest.fixture(scope="module")
def model(stories):
    return stories


@pytest.fixture(scope="module")
def sae(model):
    from saealign.saes import load_sae
    return load_sae(model=model)


@pytest.fixture(scope="module")
def padded_prompts():
    "15 P3 prompts (longer than the tests' 24-token cut) interleaved with 6 short ones, so batches need padding."
    from saealign.reference import build_reference_prompts
    short = ["Once upon a time", "Lily saw a big dog.", "The sun was hot.", "Tom had a red ball and a cat.",
             "She was sad.", "They played in the park all day."]
    long = build_reference_prompts(15, seed=1)
    return [x for i in range(5) for x in long[3 * i:3 * i + 3] + [short[i]]] + short[5:]


@pytest.fixture(scope="session")
def embedder():
    from saealign.embeddings import load_embedder
    return load_embedder()

if HAS_MIRROR:  # module-scoped fixtures load models at collection time
    os.environ.setdefault("SAEALIGN_ASSETS", str(SHARED))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def gemma():
    "Gemma 3 270M, loaded once for every test that needs a real model (its conversion is cached after the first)."
    from saealign.models import load_model
    return load_model("gemma-3-270m")
