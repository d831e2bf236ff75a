"""Completions, embeddings, model listing and health, through the SDK where it applies."""

from __future__ import annotations

import math

import httpx
import openai

from conftest import (
    DEMO_COMPLETION_TOKENS,
    DEMO_COST_USD,
    DEMO_KEY,
    DEMO_PROMPT_TOKENS,
    DEMO_REPLY,
    EMBEDDING_DIMS,
)


# --- /v1/completions -------------------------------------------------------------------------


def test_completion(client: openai.OpenAI):
    raw = client.completions.with_raw_response.create(model="demo", prompt="Say hello.")
    c = raw.parse()
    assert isinstance(c, openai.types.Completion)
    assert c.object == "text_completion"
    assert c.id.startswith("cmpl-")
    assert c.model == "demo"
    assert len(c.choices) == 1
    assert c.choices[0].text == DEMO_REPLY
    assert c.choices[0].finish_reason == "stop"
    assert c.usage.prompt_tokens == DEMO_PROMPT_TOKENS
    assert c.usage.completion_tokens == DEMO_COMPLETION_TOKENS
    assert c.usage.total_tokens == DEMO_PROMPT_TOKENS + DEMO_COMPLETION_TOKENS
    assert raw.headers["x-tollgate-deployment"] == "default/demo"
    assert raw.headers["x-tollgate-cost-usd"] == DEMO_COST_USD


def test_streamed_completion(client: openai.OpenAI):
    chunks = list(
        client.completions.create(
            model="demo",
            prompt="Say hello.",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == DEMO_REPLY
    assert all(ch.object == "text_completion" for ch in chunks)
    finishing = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishing == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == DEMO_PROMPT_TOKENS
    assert chunks[-1].usage.completion_tokens == DEMO_COMPLETION_TOKENS


def test_streamed_completion_without_usage(client: openai.OpenAI):
    chunks = list(client.completions.create(model="demo", prompt="Say hello.", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == DEMO_REPLY
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)


# --- /v1/embeddings --------------------------------------------------------------------------


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


def test_embeddings_one_vector_per_input(client: openai.OpenAI):
    inputs = ["the quick brown fox", "jumps over", "the lazy dog"]
    raw = client.embeddings.with_raw_response.create(model="demo", input=inputs)
    r = raw.parse()
    assert r.object == "list"
    assert r.model == "demo"
    assert len(r.data) == len(inputs)
    assert [d.index for d in r.data] == list(range(len(inputs)))
    for d in r.data:
        assert d.object == "embedding"
        assert len(d.embedding) == EMBEDDING_DIMS
        assert all(isinstance(x, float) for x in d.embedding)
        assert abs(_norm(d.embedding) - 1.0) < 1e-4
    assert r.usage.prompt_tokens == DEMO_PROMPT_TOKENS
    assert r.usage.total_tokens == DEMO_PROMPT_TOKENS
    assert raw.headers["x-tollgate-deployment"] == "default/demo"
    # Embeddings produce no completion tokens: 12 x $2.5/M only.
    assert raw.headers["x-tollgate-cost-usd"] == "0.00003"


def test_embeddings_are_deterministic_and_similar_texts_are_close(client: openai.OpenAI):
    # The SDK asks for base64 by default when no format is given; the float vectors the mock
    # returns must still come through as floats.
    a = client.embeddings.create(model="demo", input="kubernetes gateway").data[0].embedding
    b = client.embeddings.create(
        model="demo", input="kubernetes gateway", encoding_format="float"
    ).data[0].embedding
    c = client.embeddings.create(model="demo", input="gateway for kubernetes").data[0].embedding
    d = client.embeddings.create(model="demo", input="banana smoothie").data[0].embedding
    assert len(a) == EMBEDDING_DIMS
    assert a == b
    assert _cos(a, c) > 0.7
    assert _cos(a, c) > _cos(a, d)


def test_single_string_input_gives_one_embedding(client: openai.OpenAI):
    r = client.embeddings.create(model="demo", input="just one", encoding_format="float")
    assert len(r.data) == 1
    assert len(r.data[0].embedding) == EMBEDDING_DIMS


# --- /v1/models ------------------------------------------------------------------------------


def test_models_lists_only_the_keys_models(client: openai.OpenAI, all_client: openai.OpenAI):
    restricted = list(client.models.list())
    assert [m.id for m in restricted] == ["demo"]
    assert restricted[0].object == "model"
    assert restricted[0].owned_by == "tollgate"
    everything = sorted(m.id for m in all_client.models.list())
    assert everything == ["demo", "other"]


def test_models_list_has_request_id(http: httpx.Client):
    r = http.get(
        "/v1/models",
        headers={"authorization": f"Bearer {DEMO_KEY}", "x-request-id": "py-models-1"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "py-models-1"
    assert r.json()["object"] == "list"


# --- health ----------------------------------------------------------------------------------


def test_readiness_reports_loaded_config(http: httpx.Client):
    r = http.get("/health/readiness")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert body["models"] == 2
    assert body["keys"] == 2
    assert body["config_hash"]


def test_liveness(http: httpx.Client):
    assert http.get("/health/liveliness").status_code == 200
    assert http.get("/health/liveness").status_code == 200
