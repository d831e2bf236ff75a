"""Errors: OpenAI-shaped bodies with the right status, raised by the SDK as its own exception
types, and the raw shape for what the SDK can't send."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from conftest import ALL_KEY, BAD_KEY, DEMO_KEY, DEMO_REPLY, make_client

MESSAGES = [{"role": "user", "content": "hi"}]


def assert_openai_error(r: httpx.Response, status: int, type_: str, code: str) -> dict:
    """The raw response is `{"error": {"message", "type", "param", "code"}}` with `status`."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id"), "error responses carry x-request-id too"
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == type_
    assert err["code"] == code
    assert err["param"] is None
    assert isinstance(err["message"], str) and err["message"]
    return err


def check_sdk_error(e: openai.APIStatusError, status: int, type_: str, code: str) -> None:
    assert e.status_code == status
    assert e.code == code
    assert e.type == type_
    assert isinstance(e.body, dict) and e.body["code"] == code
    assert e.response.headers.get("x-request-id")


# --- authentication --------------------------------------------------------------------------


def test_wrong_key_raises_authentication_error(gateway):
    with make_client(gateway, BAD_KEY) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            c.chat.completions.create(model="demo", messages=MESSAGES)
    check_sdk_error(ei.value, 401, "authentication_error", "invalid_api_key")
    # The key is never echoed back.
    assert BAD_KEY not in ei.value.response.text


def test_wrong_key_on_every_endpoint(gateway):
    with make_client(gateway, BAD_KEY) as c:
        calls = [
            lambda: c.completions.create(model="demo", prompt="hi"),
            lambda: c.embeddings.create(model="demo", input="hi"),
            lambda: c.models.list(),
            lambda: list(c.chat.completions.create(model="demo", messages=MESSAGES, stream=True)),
        ]
        for call in calls:
            with pytest.raises(openai.AuthenticationError) as ei:
                call()
            assert ei.value.code == "invalid_api_key"


def test_missing_key_is_401_missing_api_key(http: httpx.Client):
    r = http.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES})
    assert_openai_error(r, 401, "authentication_error", "missing_api_key")
    r = http.get("/v1/models")
    assert_openai_error(r, 401, "authentication_error", "missing_api_key")


def test_non_bearer_authorization_is_missing_key(http: httpx.Client):
    r = http.post(
        "/v1/chat/completions",
        headers={"authorization": f"Basic {DEMO_KEY}"},
        json={"model": "demo", "messages": MESSAGES},
    )
    assert_openai_error(r, 401, "authentication_error", "missing_api_key")


def test_raw_wrong_key_shape(http: httpx.Client):
    r = http.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {BAD_KEY}"},
        json={"model": "demo", "messages": MESSAGES},
    )
    err = assert_openai_error(r, 401, "authentication_error", "invalid_api_key")
    assert BAD_KEY not in err["message"]


def test_x_api_key_header_authenticates(http: httpx.Client):
    r = http.post(
        "/v1/chat/completions",
        headers={"x-api-key": DEMO_KEY},
        json={"model": "demo", "messages": MESSAGES},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == DEMO_REPLY


# --- authorization and model lookup ----------------------------------------------------------


def test_model_not_allowed_for_key_raises_permission_denied(client: openai.OpenAI):
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model="other", messages=MESSAGES)
    check_sdk_error(ei.value, 403, "permission_error", "model_not_allowed")
    assert "other" in ei.value.body["message"]


def test_model_not_allowed_for_embeddings_and_streams(client: openai.OpenAI):
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="other", input="hi")
    with pytest.raises(openai.PermissionDeniedError):
        list(client.chat.completions.create(model="other", messages=MESSAGES, stream=True))


def test_unknown_model_raises_not_found(all_client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as ei:
        all_client.chat.completions.create(model="gpt-does-not-exist", messages=MESSAGES)
    check_sdk_error(ei.value, 404, "invalid_request_error", "model_not_found")
    assert "gpt-does-not-exist" in ei.value.body["message"]


def test_unknown_model_when_streaming_raises_not_found(all_client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as ei:
        list(
            all_client.chat.completions.create(
                model="gpt-does-not-exist", messages=MESSAGES, stream=True
            )
        )
    assert ei.value.code == "model_not_found"


# --- malformed requests ----------------------------------------------------------------------


def _post_raw(http: httpx.Client, content: bytes, path: str = "/v1/chat/completions"):
    return http.post(
        path,
        headers={"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"},
        content=content,
    )


def test_malformed_json_is_400_invalid_json(http: httpx.Client):
    err = assert_openai_error(
        _post_raw(http, b'{"model": "demo", "messages": [}'),
        400,
        "invalid_request_error",
        "invalid_json",
    )
    assert "messages" in err["message"]


def test_non_object_json_is_400_invalid_json(http: httpx.Client):
    assert_openai_error(_post_raw(http, b"[1, 2]"), 400, "invalid_request_error", "invalid_json")
    assert_openai_error(_post_raw(http, b""), 400, "invalid_request_error", "invalid_json")


def test_missing_messages_raises_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/chat/completions", body={"model": "demo"}, cast_to=ChatCompletion)
    check_sdk_error(ei.value, 400, "invalid_request_error", "missing_field")
    assert "messages" in ei.value.body["message"]


def test_null_messages_raises_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="demo", messages=None)  # type: ignore[arg-type]
    assert ei.value.code == "missing_field"


def test_missing_prompt_and_input_raise_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/completions", body={"model": "demo"}, cast_to=ChatCompletion)
    assert ei.value.code == "missing_field"
    assert "prompt" in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/embeddings", body={"model": "demo"}, cast_to=ChatCompletion)
    assert ei.value.code == "missing_field"
    assert "input" in ei.value.body["message"]


def test_missing_model_raises_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/chat/completions", body={"messages": MESSAGES}, cast_to=ChatCompletion)
    check_sdk_error(ei.value, 400, "invalid_request_error", "missing_model")


def test_non_string_model_and_stream_are_rejected(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post(
            "/chat/completions", body={"model": 7, "messages": MESSAGES}, cast_to=ChatCompletion
        )
    assert ei.value.code == "invalid_model"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model="demo", messages=MESSAGES, extra_body={"stream": "yes"}
        )
    assert ei.value.code == "invalid_stream"


def test_streamed_embeddings_are_rejected(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.embeddings.create(model="demo", input="hi", extra_body={"stream": True})
    assert ei.value.code == "invalid_stream"


def test_bad_request_takes_precedence_only_after_authentication(http: httpx.Client):
    # A malformed body with no key is an authentication failure, not a parse error.
    r = http.post(
        "/v1/chat/completions",
        headers={"content-type": "application/json"},
        content=b"{not json",
    )
    assert_openai_error(r, 401, "authentication_error", "missing_api_key")


def test_unknown_url_is_openai_shaped_404(client: openai.OpenAI, http: httpx.Client):
    r = http.post("/v1/assistants", headers={"authorization": f"Bearer {DEMO_KEY}"}, json={})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_url"
    with pytest.raises(openai.NotFoundError) as ei:
        client.post("/no/such/path", body={}, cast_to=ChatCompletion)
    assert ei.value.code == "unknown_url"


# --- request ids on errors -------------------------------------------------------------------


def test_request_id_is_echoed_on_errors(gateway, http: httpx.Client):
    r = http.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {BAD_KEY}", "x-request-id": "py-err-401"},
        json={"model": "demo", "messages": MESSAGES},
    )
    assert r.status_code == 401
    assert r.headers["x-request-id"] == "py-err-401"
    with make_client(gateway, ALL_KEY) as c:
        with pytest.raises(openai.NotFoundError) as ei:
            c.chat.completions.create(
                model="nope", messages=MESSAGES, extra_headers={"x-request-id": "py-err-404"}
            )
    assert ei.value.response.headers["x-request-id"] == "py-err-404"
    # The SDK exposes the header as the error's request_id.
    assert ei.value.request_id == "py-err-404"


def test_unknown_url_carries_request_id(http: httpx.Client):
    r = http.post("/v1/assistants", headers={"x-request-id": "py-err-url"}, json={})
    assert r.status_code == 404
    assert r.headers.get("x-request-id") == "py-err-url"


def test_overlong_client_request_id_is_replaced(http: httpx.Client):
    r = http.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {DEMO_KEY}", "x-request-id": "x" * 200},
        json={"model": "demo", "messages": MESSAGES},
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid and rid != "x" * 200 and len(rid) <= 128


def test_bad_stream_options_raise_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model="demo", messages=MESSAGES, stream=True, stream_options="yes"  # type: ignore[arg-type]
        )
    assert ei.value.code == "invalid_stream_options"


# --- request size ----------------------------------------------------------------------------

# The gateway's default limit (--max-body-bytes) is 16 MiB.
OVERSIZED = (
    b'{"model":"demo","messages":[{"role":"user","content":"'
    + b"a" * (17 << 20)
    + b'"}]}'
)


def test_oversized_body_is_413(gateway):
    # A fresh connection: the server may close it after refusing the body.
    with httpx.Client(base_url=gateway.base_url, timeout=30.0) as c:
        r = c.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"},
            content=OVERSIZED,
        )
    err = assert_openai_error(r, 413, "invalid_request_error", "request_too_large")
    assert str(16 << 20) in err["message"]


def _send_chunked_and_read(host: str, port: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
    """Sends `body` chunked on a raw socket; returns the response head and whether the server
    closed the connection within 2 s of answering."""
    with socket.create_connection((host, port), timeout=10) as s:
        try:
            s.sendall(head)
            for i in range(0, len(body), 1 << 20):
                part = body[i : i + (1 << 20)]
                s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may stop reading once it has refused the body
        s.settimeout(2)
        data, closed = b"", False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except socket.timeout:
            pass
        except OSError:
            closed = True
    return data.split(b"\r\n\r\n", 1)[0], closed


def test_413_that_closes_the_connection_says_so(gateway):
    url = httpx.URL(gateway.base_url)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\n"
        + f"authorization: Bearer {DEMO_KEY}\r\n".encode()
        + b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    resp_head, closed = _send_chunked_and_read(url.host, url.port, head, OVERSIZED)
    lines = resp_head.decode(errors="replace").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 413"), lines
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    if closed:
        assert headers.get("connection", "").lower() == "close", headers


def test_wrong_method_is_openai_shaped_405(http: httpx.Client):
    r = http.get(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {DEMO_KEY}", "x-request-id": "py-405"},
    )
    assert r.status_code == 405
    assert r.headers.get("x-request-id") == "py-405"
    assert r.json()["error"]["type"] == "invalid_request_error"
