"Finding headless Chromium and the Node driver for the real-browser tests; `skip_reason()` says what is missing."
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking"]


def chromium() -> str | None:
    "`$SAEALIGN_CHROMIUM`, else Debian's `chromium` (or `chromium-browser`) on PATH."
    found = os.environ.get("SAEALIGN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and os.access(found, os.X_OK) else None


def skip_reason(node: bool = True) -> str | None:
    "None when everything the browser tests need is here, else what to install (`make browser-deps` does it)."
    if chromium() is None:
        return "no Chromium: `apt-get install chromium` (make browser-deps does it as root) or set SAEALIGN_CHROMIUM"
    if node and shutil.which("node") is None:
        return "no Node.js to drive Chromium: install nodejs, then `make browser-deps`"
    if node and not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed: `make browser-deps` (npm ci in tests/browser)"
    return None


def dump_dom(url: str, timeout: float = 120) -> str:
    "The DOM of `url` after headless Chromium has loaded it (and run its scripts)."
    # a private profile: a second Chromium on the default one would hand the page to the first and exit
    profile = ARTIFACTS / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
           "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
