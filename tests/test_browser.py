"""The widgets notebook in a real browser: JupyterLab on loopback, headless Chromium driven by playwright-core.
Runs the notebook, clicks Generate, checks the highlighted tokens, switches the colour toggle to steer attribution and
checks the same tokens recoloured; screenshots (each mode, and the explorer at the end) go to tests/artifacts/."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from browser_support import ARTIFACTS, BROWSER_DIR, ROOT, chromium, skip_reason
from conftest import needs_mirror

pytestmark = [needs_mirror, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    "JupyterLab serving a copy of the widgets notebook (so autosave never touches nbs/); killed afterwards."
    shutil.copy(ROOT / "nbs" / "05_widgets.ipynb", tmp_path / "05_widgets.ipynb")
    # fresh user settings: no news prompt over the page
    settings = tmp_path / ".lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={tmp_path}", f"--LabApp.workspaces_dir={tmp_path / '.workspaces'}",
           f"--LabApp.user_settings_dir={tmp_path / '.lab-settings'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / ".runtime")})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"{base}/lab/tree/05_widgets.ipynb?token={token}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def rgb(hex_colour: str) -> str:
    "A `#rrggbb` colour as the browser's computed style writes it."
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_explorer_generates_highlighted_tokens_in_jupyterlab(lab, tmp_path, model, sae, embedder):
    from saealign.render import attribution_colour, contamination_colour
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "explorer.png"
    shots = {m: ARTIFACTS / f"explorer-{m}.png" for m in ("calibrated", "attribution")}
    for path in (shot, *shots.values()):
        path.unlink(missing_ok=True)
    start = time.time()
    run = subprocess.run(["node", str(BROWSER_DIR / "explore.mjs"), chromium(), lab, str(shot), "900000"],
                         capture_output=True, text=True, timeout=1000, cwd=BROWSER_DIR)
    assert run.returncode == 0, f"{run.stderr[-4000:]}\n--- jupyter log ---\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}"
    page = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"browser run {time.time() - start:.0f} s", run.stderr, sep="\n")

    tokens = page["tokens"]
    columns = {t["column"] for t in tokens}
    assert columns == {"unsteered", "steered"}
    for column in columns:
        assert 1 <= sum(t["column"] == column for t in tokens) <= 48  # the widget's default max new tokens
    for t in tokens:  # the default mode: the colour the browser computed is the one the token's percentile implies
        assert t["background"] == rgb(contamination_colour(float(t["calibrated"]))), t
        assert t["text"] and t["title"].startswith(repr(t["text"].replace("↵\n", "\n")) + ":")
        assert "contamination" in t["title"] or "no active latent" in t["title"]
    # the colour toggle: the same tokens, coloured by their steer attribution, differently
    modes = page["modes"]
    assert set(modes) == {"calibrated", "attribution"} and modes["calibrated"] == tokens
    recoloured = modes["attribution"]
    assert [t["text"] for t in recoloured] == [t["text"] for t in tokens]
    for t in recoloured:
        assert t["background"] == rgb(attribution_colour(float(t["attribution"]))), t
    steered = [(a, b) for a, b in zip(tokens, recoloured) if a["column"] == "steered"]
    assert sum(a["background"] != b["background"] for a, b in steered) > len(steered) // 2
    assert all(path.stat().st_size > 10_000 for path in shots.values())
    assert "generated in" in page["status"] and page["chart"] >= 1 and page["inspectorRows"] == 10
    # picking the food topic filled in its texts and re-ranked the latents as the library ranks them
    from saealign.reference import default_reference
    from saealign.scoring import STORY_TOPICS, score_latents
    assert page["texts"].splitlines() == STORY_TOPICS["food"]
    ref = default_reference(model, sae, embedder, progress=False)  # the notebook's, from the same cache
    best = {t: int(score_latents(ref, STORY_TOPICS[t], embedder).top(1)) for t in ("sea", "food")}
    assert (int(page["seaTop"]), int(page["foodTop"])) == (best["sea"], best["food"]) and best["sea"] != best["food"]
    assert shot.stat().st_size > 10_000
