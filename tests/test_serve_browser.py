"""The status page at ``/`` in a real headless browser (Chromium from the system packages:
``apt-get install chromium``; skipped where it is not installed): the page's script fetches
``/status.json`` from a running server and the numbers it writes into the page are read back.
About 5 s."""
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = [pytest.mark.skipif(BROWSER is None, reason="no Chromium (apt-get install chromium)"),
              pytest.mark.usefixtures("one_thread")]

from test_serve import tiny_model

from cl_arch.serve import Engine, open_store
from cl_arch.serve.app import create_app

ADMIN = "admin-token-0123456789"


def render(url: str) -> str:
    """The page's DOM after its script ran (the browser's virtual clock lets the fetch finish)."""
    out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", url], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def by_id(dom: str, name: str) -> str:
    m = re.search(rf'id="{name}">([^<]*)<', dom)
    assert m, f"no element {name} in the page"
    return m.group(1)


def user_row(dom: str, uid: str) -> list:
    m = re.search(rf'<tr data-user="{uid}">(.*?)</tr>', dom)
    assert m, f"no row for {uid}"
    return re.findall(r"<td[^>]*>([^<]*)<", m.group(1))


@pytest.fixture
def server(tmp_path):
    engine = Engine(tiny_model(["fast", "fast"]), open_store(str(tmp_path / "s.db")))
    app = create_app(engine, tokens={ADMIN: "*"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 30 and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


def test_status_page_shows_users_tokens_and_running_rewards(server):
    h = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(headers=h, timeout=60) as c:
        for uid, rewards in (("alice", [1.0, 1.0, -1.0]), ("bob", [-1.0])):
            for r in rewards:
                assert c.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "user": uid}).status_code == 200
                assert c.post(f"{server}/v1/sessions/{uid}/reward", json={"reward": r}).status_code == 200
    dom = render(f"{server}/#token={ADMIN}")
    assert by_id(dom, "err") == ""
    assert (by_id(dom, "adapt"), by_id(dom, "sessions"), by_id(dom, "tokens"), by_id(dom, "commits")) == ("on", "2", "12", "4")
    assert float(by_id(dom, "tps")) > 0
    # user, in memory, rewards, running reward (1 -> 1 -> 0.9 * 1 + 0.1 * -1), accepted of the last 50
    assert user_row(dom, "alice")[:5] == ["alice", "yes", "3", "0.800", "0.67"]
    assert user_row(dom, "bob")[:5] == ["bob", "yes", "1", "-1.000", "0.00"]
    # without the token the page loads but its data is refused, and it says so
    dom = render(server + "/")
    assert by_id(dom, "err") == "Error: status.json: HTTP 401" and "data-user" not in dom
