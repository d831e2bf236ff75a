"""Starts the real Tollgate data plane once per test session and hands out clients for it.

The binary is `$TOLLGATE_BIN`, or `<repo>/target/debug/tollgate-dataplane` when that is unset
(build it with `cargo build -p tollgate-dataplane`). It serves the manifests below from a
temporary directory on a free port of 127.0.0.1; its log goes to `dataplane.log` in that
directory and is printed when it fails to start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]

# Keys (the gateway only ever sees their SHA-256).
DEMO_KEY = "sk-tollgate-python-test-0001"  # may use `demo` only
ALL_KEY = "sk-tollgate-python-test-all-0002"  # may use every model
BAD_KEY = "sk-tollgate-python-test-wrong-9999"  # not configured

# What the `demo` mock model answers, and what that costs.
DEMO_REPLY = "Hello from the mock model"
DEMO_PROMPT_TOKENS = 12
DEMO_COMPLETION_TOKENS = 5
DEMO_CHUNKS = 5
# 12 prompt tokens at $2.5/M + 5 completion tokens at $10/M.
DEMO_COST_USD = "0.00008"
EMBEDDING_DIMS = 64

# The `other` model takes the mock's defaults: this reply, one stream chunk per word.
OTHER_REPLY = "Hello from Tollgate's mock model!"

MANIFESTS = f"""\
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {{name: demo}}
spec:
  modelName: demo
  provider: mock
  mock:
    reply: "{DEMO_REPLY}"
    promptTokens: {DEMO_PROMPT_TOKENS}
    completionTokens: {DEMO_COMPLETION_TOKENS}
    chunks: {DEMO_CHUNKS}
  pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}
---
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {{name: other}}
spec: {{modelName: other, provider: mock}}
---
apiVersion: v1
kind: Secret
metadata: {{name: demo-key}}
stringData: {{key: {DEMO_KEY}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {{name: demo}}
spec:
  secretRef: {{name: demo-key}}
  models: [demo]
---
apiVersion: v1
kind: Secret
metadata: {{name: all-key}}
stringData: {{key: {ALL_KEY}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {{name: all}}
spec:
  secretRef: {{name: all-key}}
"""

READY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Gateway:
    """A running data plane."""

    base_url: str  # http://127.0.0.1:PORT, no trailing slash
    log_path: Path

    @property
    def api_url(self) -> str:
        """Base URL for OpenAI clients."""
        return f"{self.base_url}/v1"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<no log: {e}>"


def _binary() -> Path:
    env = os.environ.get("TOLLGATE_BIN")
    path = Path(env) if env else REPO / "target" / "debug" / "tollgate-dataplane"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.exit(
            f"Tollgate data plane binary not found or not executable: {path}\n"
            + ("(from $TOLLGATE_BIN)\n" if env else "")
            + "Build it with `cargo build -p tollgate-dataplane`, "
            "or set TOLLGATE_BIN to the binary's absolute path.",
            returncode=2,
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"tollgate-dataplane exited with code {proc.returncode} before it was ready.\n"
                f"--- log ({log_path}) ---\n{log_path.read_text(errors='replace')}"
            )
        try:
            r = httpx.get(f"{base_url}/health/readiness", timeout=1.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.05)
    raise RuntimeError(
        f"tollgate-dataplane was not ready within {READY_TIMEOUT_S:.0f}s (last: {last}).\n"
        f"--- log ({log_path}) ---\n{log_path.read_text(errors='replace')}"
    )


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    binary = _binary()
    workdir = tmp_path_factory.mktemp("tollgate")
    manifests = workdir / "manifests"
    manifests.mkdir()
    (manifests / "gateway.yaml").write_text(MANIFESTS)
    log_path = workdir / "dataplane.log"
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "--manifests", str(manifests), "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        failure = None
        try:
            _wait_ready(proc, base_url, log_path)
        except RuntimeError as e:
            failure = str(e)
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        yield Gateway(base_url=base_url, log_path=log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def make_client(gateway: Gateway, key: str, **kw) -> openai.OpenAI:
    # No retries: a test must see the gateway's first answer, not a retried one.
    kw.setdefault("base_url", gateway.api_url)
    return openai.OpenAI(api_key=key, max_retries=0, timeout=15.0, **kw)


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    """SDK client with the key restricted to `demo`."""
    c = make_client(gateway, DEMO_KEY)
    yield c
    c.close()


@pytest.fixture(scope="session")
def all_client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    """SDK client with the key that may use every model."""
    c = make_client(gateway, ALL_KEY)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    """Raw HTTP client for what the SDK hides (no key, malformed bodies, exact bytes)."""
    with httpx.Client(base_url=gateway.base_url, timeout=15.0) as c:
        yield c


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test, attach the gateway's log tail to the report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and "gateway" in getattr(item, "funcargs", {}):
        gw: Gateway = item.funcargs["gateway"]
        tail = "\n".join(gw.log().splitlines()[-40:])
        rep.sections.append(("tollgate-dataplane log (tail)", tail))
