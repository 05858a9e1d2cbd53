"""A real browser for the tests: Debian's chromium (installed by ``scripts/setup-env --tests``
through apt when it is missing) driven by Playwright's Python package. Playwright's own
browser download cannot run here, so its ``executable_path`` points at the system one.

Tests use the ``browser`` fixture (one headless chromium per module) and ``screenshot`` to keep
what the browser showed: PNGs land in ``$RAYBATCH_ARTIFACTS`` (default
``.raybatch-test/artifacts/screenshots``), which CI keeps as artefacts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def chromium_path() -> str | None:
    """A chromium that runs (Ubuntu's ``chromium-browser`` may be a stub that asks for snap)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            try:
                ok = subprocess.run([found, "--version"], capture_output=True, timeout=30).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return found
    return None


def artifacts_dir() -> Path:
    d = Path(os.environ.get("RAYBATCH_ARTIFACTS", ROOT / ".raybatch-test" / "artifacts")) / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def screenshot(page, name: str) -> Path:
    path = artifacts_dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".png")
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("no working chromium on PATH: `scripts/setup-env --tests` installs Debian's chromium with apt "
                    "(it needs root and apt-get); the browser tests cannot run without it")
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()
