"""The web console in a real browser: Debian's chromium driven by Playwright, against
real agents over real TLS (the browser trusts exactly the agents' keys, by their SPKI
hashes). It shows the agents, runs a task submitted from its form to SUCCEEDED, shows a
drained agent as draining, and sends an expired token back to the login form."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, Page, expect, sync_playwright
from support import AgentProc, Cluster

from mesh.trust.tokens import LEEWAY_S

CHROMIUM = os.environ.get("MESH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
WAIT_MS = 15_000  # a hang guard for each condition, not a measurement
SCREENSHOT = os.environ.get("MESH_CONSOLE_SCREENSHOT")  # where to keep one (docs/console.png)
expect.set_options(timeout=WAIT_MS)


def spki(certificate: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)): what chromium's SPKI allow-list takes."""
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
def agents(cluster: Cluster, tmp_path: Path) -> list[AgentProc]:
    spans = tmp_path / "spans"  # shared, as on the local mesh: any agent serves any span
    return [
        cluster.start(name, fake_gpus="2xA100-80GB", span_dir=spans, trace_sample_ratio=1)
        for name in ("ui-1", "ui-2")
    ]


@pytest.fixture
def browser(cluster: Cluster, agents: list[AgentProc]) -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM} (.ci/run installs Debian's)"
    pins = ",".join(spki(cluster.trust.agent(a.agent_id, "west").cert) for a in agents)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", f"--ignore-certificate-errors-spki-list={pins}"],
        )
        try:
            yield browser
        finally:
            browser.close()


def open_console(browser: Browser, agent: AgentProc, token: str) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{agent.http_url}/ui/#token={token}")
    return page


def test_the_console_shows_the_mesh_runs_a_task_and_follows_a_drain(
    browser: Browser, agents: list[AgentProc], cluster: Cluster, tmp_path: Path
) -> None:
    token = cluster.security.token or ""
    page = open_console(browser, agents[0], token)
    for agent in agents:
        expect(page.locator(f'[data-agent="{agent.agent_id}"]')).to_be_visible()
    assert "token=" not in page.url  # read from the fragment, then dropped from the address

    page.fill("#submit-form input[name=pipeline]", "sleep")
    page.fill("#submit-form input[name=model]", "sdxl")
    page.fill("#submit-form input[name=params]", "seconds=0.5 steps=2")
    page.click("#submit-form button")
    expect(page.locator("#task-state")).to_have_text("SUCCEEDED")
    task_id = page.locator("#task-id").text_content() or ""  # as written, not as styled
    expect(page.locator(f'#tasks tr[data-task="{task_id}"] .state')).to_have_text("SUCCEEDED")
    expect(page.locator("#task-path li")).not_to_have_count(0)
    expect(page.locator("#waterfall .span")).not_to_have_count(0)
    page.click("#rerun")  # ended: it may run again, as a new task that names this one
    expect(page.locator("#rerun-of")).to_have_text(task_id)
    expect(page.locator("#task-state")).to_have_text("SUCCEEDED")
    assert page.locator("#task-id").text_content() != task_id

    meshctl = [sys.executable, "-m", "mesh.cli", *cluster.cli_user()]
    drain = [*meshctl, "drain", "ui-2", "--endpoint", agents[0].address]
    done = subprocess.run(drain, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expect(page.locator('[data-agent="ui-2"]')).to_have_attribute("data-state", "draining")

    for _ in range(3):  # ui-1 runs two: the third waits, and says until when
        page.fill("#submit-form input[name=params]", "seconds=60 steps=2")
        page.click("#submit-form button")
        expect(page.locator("#task-state")).not_to_have_text("PENDING")
    expect(page.locator("#task-state")).to_have_text("QUEUED")
    expect(page.locator("#task-eta")).to_contain_text("expected to start in")
    shot = tmp_path / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if SCREENSHOT:
        shutil.copy(shot, SCREENSHOT)


def test_an_expired_token_sends_the_console_back_to_login(
    browser: Browser, agents: list[AgentProc], cluster: Cluster
) -> None:
    # Valid for about 3 s more: agents accept a token LEEWAY_S past its expiry (clock skew).
    brief = cluster.trust.token("brief", ttl=datetime.timedelta(seconds=3 - LEEWAY_S))
    page = open_console(browser, agents[0], brief)
    expect(page.locator('[data-agent="ui-1"]')).to_be_visible()
    expect(page.locator("#login")).to_be_visible()  # once the token expires
    expect(page.locator("#login-why")).to_contain_text("Logged out")
    expect(page.locator("#console")).to_be_hidden()
