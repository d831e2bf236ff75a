"""`POST /v1/chat/completions` through the official OpenAI SDK: whole and streamed replies,
usage, cost and the gateway's own headers."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx
import openai

from conftest import (
    ALL_KEY,
    DEMO_CHUNKS,
    DEMO_COMPLETION_TOKENS,
    DEMO_COST_USD,
    DEMO_KEY,
    DEMO_PROMPT_TOKENS,
    DEMO_REPLY,
    OTHER_REPLY,
    make_client,
)

MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_non_streaming_reply_is_an_openai_chat_completion(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=MESSAGES)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    c = raw.parse()
    assert isinstance(c, openai.types.chat.ChatCompletion)
    assert c.object == "chat.completion"
    assert c.id.startswith("chatcmpl-")
    assert c.model == "demo"
    assert c.created > 1_600_000_000
    assert len(c.choices) == 1
    choice = c.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == DEMO_REPLY
    assert c.usage is not None
    assert c.usage.prompt_tokens == DEMO_PROMPT_TOKENS
    assert c.usage.completion_tokens == DEMO_COMPLETION_TOKENS
    assert c.usage.total_tokens == DEMO_PROMPT_TOKENS + DEMO_COMPLETION_TOKENS


def test_non_streaming_headers_name_deployment_and_cost(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=MESSAGES)
    assert raw.headers["x-tollgate-deployment"] == "default/demo"
    cost = raw.headers["x-tollgate-cost-usd"]
    # Exact decimal string: 12 x $2.5/M + 5 x $10/M.
    assert cost == DEMO_COST_USD
    assert Decimal(cost) == Decimal(12) * Decimal("2.5") / 10**6 + Decimal(5) * 10 / 10**6
    rid = raw.headers["x-request-id"]
    assert rid and len(rid) <= 128


def test_unpriced_model_costs_zero(all_client: openai.OpenAI):
    raw = all_client.chat.completions.with_raw_response.create(model="other", messages=MESSAGES)
    c = raw.parse()
    assert c.choices[0].message.content == OTHER_REPLY
    assert raw.headers["x-tollgate-deployment"] == "default/other"
    assert Decimal(raw.headers["x-tollgate-cost-usd"]) == 0
    # No completionTokens configured: one per word of the reply.
    assert c.usage.completion_tokens == len(OTHER_REPLY.split())
    # No promptTokens configured: an estimate that is at least 1.
    assert c.usage.prompt_tokens >= 1


def test_generated_request_ids_differ(client: openai.OpenAI):
    ids = {
        client.chat.completions.with_raw_response.create(
            model="demo", messages=MESSAGES
        ).headers["x-request-id"]
        for _ in range(3)
    }
    assert len(ids) == 3


def test_client_request_id_is_echoed_and_used_as_completion_id(client: openai.OpenAI):
    rid = "py-test-req-0123456789"
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, extra_headers={"x-request-id": rid}
    )
    assert raw.headers["x-request-id"] == rid
    assert raw.parse().id == f"chatcmpl-{rid}"


def test_extra_openai_parameters_are_accepted(client: openai.OpenAI):
    c = client.chat.completions.create(
        model="demo",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "héllo ✓ \"quoted\"\n"},
        ],
        temperature=0.2,
        max_tokens=16,
        top_p=0.9,
        user="py-test",
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "noop",
                    "parameters": {"type": "object", "properties": {}},
                },
            }
        ],
    )
    assert c.choices[0].message.content == DEMO_REPLY


def test_base_url_without_v1_prefix_also_works(gateway):
    with make_client(gateway, DEMO_KEY, base_url=gateway.base_url) as c:
        r = c.chat.completions.create(model="demo", messages=MESSAGES)
    assert r.choices[0].message.content == DEMO_REPLY


# --- streaming -------------------------------------------------------------------------------


def _collect(stream) -> list[openai.types.chat.ChatCompletionChunk]:
    return list(stream)


def _content(chunks) -> str:
    return "".join(
        ch.choices[0].delta.content or "" for ch in chunks if ch.choices
    )


def test_stream_deltas_concatenate_to_reply_without_usage(client: openai.OpenAI):
    with client.chat.completions.with_streaming_response.create(
        model="demo", messages=MESSAGES, stream=True
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-tollgate-deployment"] == "default/demo"
        assert resp.headers["x-request-id"]
        chunks = _collect(resp.parse())
    assert chunks, "no chunks"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert all(ch.model == "demo" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert _content(chunks) == DEMO_REPLY
    # The reply is split into the configured number of non-empty content chunks.
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) == DEMO_CHUNKS
    assert chunks[0].choices[0].delta.role == "assistant"
    # The client did not ask for usage: the chunk the gateway requested for itself is dropped.
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks), "a usage-only (empty choices) chunk leaked"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_with_include_usage_ends_with_usage_chunk(client: openai.OpenAI):
    chunks = _collect(
        client.chat.completions.create(
            model="demo",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert _content(chunks) == DEMO_REPLY
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == DEMO_PROMPT_TOKENS
    assert last.usage.completion_tokens == DEMO_COMPLETION_TOKENS
    assert last.usage.total_tokens == DEMO_PROMPT_TOKENS + DEMO_COMPLETION_TOKENS
    # Exactly one chunk carries usage, and it is the last.
    assert [ch.usage is not None for ch in chunks].count(True) == 1
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_stream_with_include_usage_false_has_no_usage(client: openai.OpenAI):
    chunks = _collect(
        client.chat.completions.create(
            model="demo",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": False},
        )
    )
    assert _content(chunks) == DEMO_REPLY
    assert all(ch.usage is None for ch in chunks)


def test_stream_of_default_mock_is_one_chunk_per_word(all_client: openai.OpenAI):
    chunks = _collect(
        all_client.chat.completions.create(model="other", messages=MESSAGES, stream=True)
    )
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == OTHER_REPLY
    assert [p.strip() for p in pieces] == OTHER_REPLY.split()


def _sse_events(body: str) -> list[str]:
    events = [e for e in body.split("\n\n") if e.strip()]
    out = []
    for e in events:
        data = [ln[len("data:"):].lstrip() for ln in e.splitlines() if ln.startswith("data:")]
        out.append("\n".join(data))
    return out


def test_raw_stream_is_sse_ending_in_done_without_usage(http: httpx.Client):
    r = http.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {DEMO_KEY}"},
        json={"model": "demo", "messages": MESSAGES, "stream": True},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert "".join(
        p["choices"][0]["delta"].get("content") or "" for p in payloads
    ) == DEMO_REPLY
    assert all("usage" not in p or p["usage"] is None for p in payloads), r.text


def test_raw_stream_with_usage_has_usage_before_done(http: httpx.Client):
    r = http.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {DEMO_KEY}"},
        json={
            "model": "demo",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": DEMO_PROMPT_TOKENS,
        "completion_tokens": DEMO_COMPLETION_TOKENS,
        "total_tokens": DEMO_PROMPT_TOKENS + DEMO_COMPLETION_TOKENS,
    }


def test_concurrent_async_streams_each_get_the_whole_reply(gateway):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int | None]:
        stream = await c.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": f"request {i}"}],
            stream=True,
            stream_options={"include_usage": i % 2 == 0},
        )
        text, usage = "", None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
            if ch.usage is not None:
                usage = ch.usage.total_tokens
        return text, usage

    async def main():
        async with openai.AsyncOpenAI(
            api_key=ALL_KEY, base_url=gateway.api_url, max_retries=0, timeout=15.0
        ) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    results = asyncio.run(main())
    for i, (text, usage) in enumerate(results):
        assert text == DEMO_REPLY, i
        if i % 2 == 0:
            assert usage == DEMO_PROMPT_TOKENS + DEMO_COMPLETION_TOKENS, i
        else:
            assert usage is None, i


def test_explicit_stream_false_is_a_whole_reply(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, stream=False
    )
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.parse().choices[0].message.content == DEMO_REPLY
