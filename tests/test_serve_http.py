"""cl_arch.serve's HTTP API (FastAPI TestClient, in process): OpenAI-style completions (plain,
streamed, stop strings), rewards, observe, get/delete, bearer tokens bound to ids, limits as named
4xx, /health, /metrics, the status page's data. About 3 s."""
import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from test_serve import tiny_model

from cl_arch.serve import Engine, ServeConfig, open_store
from cl_arch.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def client(tmp_path):
    engine = Engine(tiny_model(["fast", "fast"], seed=1), open_store(str(tmp_path / "s.db")),
                    ServeConfig(max_tokens=32, max_request_bytes=2000))
    with TestClient(create_app(engine, model_name="tiny")) as c:
        c.engine = engine
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json=dict({"max_tokens": 6, "temperature": 0, "user": "u"}, **body))


def test_complete_reward_complete(client):
    r = complete(client, prompt="def f(x):")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}
    r = client.post("/v1/sessions/u/reward", json={"reward": 1.0})
    assert r.status_code == 200 and r.json()["episodes"] == 1 and r.json()["committed"]
    s = client.get("/v1/sessions/u").json()
    assert s["stored_sha256"] == r.json()["stored_sha256"] and s["episode_length"] == 0
    assert complete(client, prompt="def f(x):").status_code == 200
    o = client.post("/v1/sessions/u/observe", json={"text": "return x"}).json()
    assert o["tokens"] == 8 and o["episode_length"] == 9 + 6 + 8
    r = client.post("/v1/sessions/u/reward", json={"reward": None})  # commit without reward
    assert r.json()["episodes"] == 2 and r.json()["rewards"] == 1
    assert client.delete("/v1/sessions/u").json() == {"id": "u", "deleted": True}
    assert client.get("/v1/sessions/u").status_code == 404


def test_stream_equals_the_plain_completion_and_stop_strings_cut(client):
    # this model (seed 1) answers "def f(x):" with "|(x):|(x" greedily: text to cut inside
    plain = complete(client, prompt="def f(x):", user="p", max_tokens=8).json()["choices"][0]["text"]
    assert plain == "|(x):|(x"
    with client.stream("POST", "/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0,
                                                        "user": "q", "stream": True, "stop": [":|", "zz"]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "|(x)"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0,
                                                        "user": "s", "stream": True}) as r:
        pieces = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in pieces) == plain and len(pieces) == 9  # 8 tokens + the end
    r = complete(client, prompt="def f(x):", user="t", stop="(x", max_tokens=8).json()["choices"][0]
    assert r == {"text": "|", "index": 0, "logprobs": None, "finish_reason": "stop"}


def test_limits_and_bad_requests_are_named_4xx(client):
    def err(r, status, code):
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code, r.text
        return r.json()["error"]["message"]

    assert "max_tokens=32" in err(complete(client, prompt="a", max_tokens=33), 400, "max_tokens")
    assert "max_request_bytes=2000" in err(complete(client, prompt="a" * 3000), 413, "max_request_bytes")
    err(complete(client, prompt="a", user=None), 400, "user_required")
    err(complete(client, prompt="a", user="../x"), 400, "invalid_session_id")
    err(complete(client, prompt="a", n=2), 400, "invalid_field")
    err(complete(client, prompt="a", frobnicate=1), 400, "invalid_field")
    err(client.post("/v1/completions", content=b"{not json"), 400, "invalid_json")
    err(client.post("/v1/sessions/nobody/reward", json={"reward": 1}), 404, "no_session")
    complete(client, prompt="a", user="v")
    err(client.post("/v1/sessions/v/reward", content=b'{"reward": NaN}'), 400, "invalid_reward")
    assert "1e+06" in err(client.post("/v1/sessions/v/reward", json={"reward": 1e7}), 400, "invalid_reward")
    client.post("/v1/sessions/v/reward", json={"reward": 1})
    err(client.post("/v1/sessions/v/reward", json={"reward": 1}), 400, "no_episode")
    text = client.get("/metrics").text
    assert 'cl_arch_requests_rejected_total{limit="max_tokens"} 1' in text
    assert 'cl_arch_requests_rejected_total{limit="max_request_bytes"} 1' in text
    assert 'cl_arch_requests_total{endpoint="/v1/completions",status="200"} 1' in text


def test_bearer_tokens_bind_ids(tmp_path):
    engine = Engine(tiny_model(["fast", "fast"]), open_store(str(tmp_path / "s.db")))
    tokens = {"alice-token-0123456789": ["alice"], "admin-token-0123456789": "*"}
    with TestClient(create_app(engine, tokens=tokens)) as c:
        def call(token, uid):
            h = {"Authorization": f"Bearer {token}"} if token else {}
            return c.post("/v1/completions", headers=h, json={"prompt": "x", "max_tokens": 2, "user": uid})

        assert call("admin-token-0123456789", "bob").status_code == 200
        c.post("/v1/sessions/bob/reward", json={"reward": 1}, headers={"Authorization": "Bearer admin-token-0123456789"})
        bob = engine.call("get", "bob")["p_sha256"]
        assert call(None, "alice").status_code == 401
        assert call("wrong-token-0123456789", "alice").status_code == 401
        assert call("alice-token-0123456789", "alice").status_code == 200
        r = call("alice-token-0123456789", "bob")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        h = {"Authorization": "Bearer alice-token-0123456789"}
        assert c.post("/v1/sessions/bob/reward", json={"reward": -1}, headers=h).status_code == 403
        assert c.delete("/v1/sessions/bob", headers=h).status_code == 403
        assert c.get("/status.json", headers=h).status_code == 403
        assert c.post("/v1/sessions/alice/reward", json={"reward": -1}, headers=h).status_code == 200
        assert engine.call("get", "bob")["p_sha256"] == bob  # nothing alice's token did touched bob
        assert c.get("/health").json()["status"] == "ok"  # health needs no token


def test_status_page_and_its_data(client):
    for uid, r in (("a", 1.0), ("b", -1.0)):
        complete(client, prompt="x", user=uid)
        client.post(f"/v1/sessions/{uid}/reward", json={"reward": r})
    page = client.get("/")
    assert page.status_code == 200 and "status.json" in page.text
    s = client.get("/status.json").json()
    assert s["sessions_in_memory"] == 2 and s["tokens_total"] == 12 and s["commits_total"] == 2
    assert [(u["id"], u["running_reward"], u["rewards"]) for u in s["users"]] == [("a", 1.0, [1.0]), ("b", -1.0, [-1.0])]
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["adapt"] is True and len(h["fingerprint"]) == 16
