import os
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
    if not HAS_MIRROR:
        pytest.skip("no asset mirror: set SAEALIGN_ASSETS")
    os.environ.setdefault("SAEALIGN_ASSETS", str(SHARED))
    from saealign.core import load_model
    return load_model("stories260K")

if HAS_MIRROR:  # module-scoped fixtures load models at collection time
    os.environ.setdefault("SAEALIGN_ASSETS", str(SHARED))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
