"""One meaning per request body: the gateway decides on exactly what the upstream reads.

The upstream here is a real HTTP server on Python's standard `json` module, which keeps the
*last* copy of a repeated name, as vLLM's and pydantic's parsers do. A body that repeats a
name must be refused before it reaches the upstream (`400 duplicate_field`), whichever way it
is spelt; a plain body goes through and is read upstream as the gateway read it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import httpx
import pytest

from conftest import Gateway, _binary, _free_port, _wait_ready

CHEAP_KEY = "sk-tollgate-python-one-meaning-cheap"
PROMPT_TOKENS = 11
COMPLETION_TOKENS = 7


class _Upstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that parses with `json.loads` (last copy wins)."""

    received: list[dict] = []

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        req = json.loads(self._body())
        assert self.path == "/v1/chat/completions", self.path
        assert isinstance(req.get("model"), str) and isinstance(req.get("messages"), list), req
        _Upstream.received.append(req)
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        }
        if req.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": req["model"],
                "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if (req.get("stream_options") or {}).get("include_usage"):
                chunk = dict(chunk, choices=[], usage=usage)
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True
            return
        body = json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": req["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gw(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("one-meaning")
    manifests = workdir / "manifests"
    manifests.mkdir()
    models = "".join(
        f"""\
---
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {{name: {name}}}
spec:
  modelName: {name}
  provider: openai-compatible
  url: {upstream}
  pricing: {{inputPerMillion: {price}, outputPerMillion: {price}}}
"""
        for name, price in [("cheap", 1), ("premium", 1000)]
    )
    (manifests / "gateway.yaml").write_text(
        models
        + f"""\
---
apiVersion: v1
kind: Secret
metadata: {{name: cheap-key}}
stringData: {{key: {CHEAP_KEY}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {{name: cheap}}
spec:
  secretRef: {{name: cheap-key}}
  models: [cheap]
"""
    )
    log_path = workdir / "dataplane.log"
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(_binary()), "--manifests", str(manifests), "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=dict(os.environ),
        )
    try:
        _wait_ready(proc, base_url, log_path)
        yield Gateway(base_url=base_url, log_path=log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _post(gw: Gateway, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{gw.api_url}/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {CHEAP_KEY}", "Content-Type": "application/json"},
        timeout=10.0,
    )


MESSAGES = '"messages":[{"role":"user","content":"hi"}]'


@pytest.mark.parametrize(
    "body",
    [
        # A key allowed only `cheap` would be served (and charged as) `cheap` by `premium`.
        '{"model":"cheap",' + MESSAGES + ',"model":"premium"}',
        # The same with the second name escaped: only decoding shows it is `model`.
        '{"model":"cheap",' + MESSAGES + ',"mod\\u0065l":"premium"}',
        # The upstream would send no usage chunk, and the stream would be free.
        '{"model":"cheap",' + MESSAGES + ',"stream":true,'
        '"stream_options":{"include_usage":true,"include_usage":false}}',
        # Reserved for 1 token, generated up to 100,000.
        '{"model":"cheap",' + MESSAGES + ',"max_tokens":1,"max_tokens":100000}',
        # Inside a message: the estimate and the upstream would read different prompts.
        '{"model":"cheap","messages":[{"role":"user","content":"a","content":"' + "b" * 5000 + '"}]}',
    ],
)
def test_a_repeated_name_never_reaches_the_upstream(gw: Gateway, body: str) -> None:
    before = len(_Upstream.received)
    r = _post(gw, body.encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "duplicate_field"
    assert "send each field once" in err["message"]
    assert len(_Upstream.received) == before, "the ambiguous body reached the upstream"


def test_a_plain_body_is_read_upstream_as_the_gateway_read_it(gw: Gateway) -> None:
    before = len(_Upstream.received)
    r = _post(gw, ('{"model":"cheap",' + MESSAGES + "}").encode())
    assert r.status_code == 200, r.text
    assert _Upstream.received[before:] == [
        {"model": "cheap", "messages": [{"role": "user", "content": "hi"}]}
    ]
    # Charged at `cheap`'s price ($1/M) for what the upstream said it served.
    assert r.headers["x-tollgate-cost-usd"] == f"{(PROMPT_TOKENS + COMPLETION_TOKENS) / 1e6:.6f}"
    # A stream is asked for usage upstream, so it is charged too.
    r = _post(gw, ('{"model":"cheap",' + MESSAGES + ',"stream":true}').encode())
    assert r.status_code == 200, r.text
    assert _Upstream.received[-1]["stream_options"] == {"include_usage": True}
    assert "[DONE]" in r.text
