"""The HTTP service (``ccdrec serve``): answers equal ``ccdrec recommend``'s, hot swap under load loses no
request and every answer names the model that computed it, a corrupt checkpoint is refused, malformed
input gets the right status, and the page shows the run in a real headless browser."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'ccdrec[serve]'")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from ccdrec.data.stream import save_stream  # noqa: E402
from ccdrec.data.synthetic import synthetic_stream  # noqa: E402
from ccdrec.errors import CcdrecError  # noqa: E402
from ccdrec.pipeline.ccd import run_stream  # noqa: E402
from ccdrec.pipeline.rundir import RunDir  # noqa: E402
from ccdrec.presets import load_config  # noqa: E402
from ccdrec.serve import load_run  # noqa: E402
from ccdrec.service.app import create_app  # noqa: E402
from ccdrec.service.server import listen  # noqa: E402
from ccdrec.service.swap import ModelSlot, RunWatcher, point, publish  # noqa: E402
from ccdrec.service.version import load_version  # noqa: E402

OVERRIDES = ["student.topn=10", "teacher.members=[{kind: mf, dim: 8, seed: 0}, {kind: lightgcn, dim: 8, seed: 1}]"]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ccdrec", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, finished_run):
    """A finished two-block CCD run on a synthetic stream (a few seconds)."""
    return finished_run(tmp_path_factory.mktemp("service"), synthetic_stream(n_blocks=2, seed=4), OVERRIDES)


ODD_USERS = [
    "a/b",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    ".",
    "..",
    " padded ",
    "x?y#z&k=1%2F+",
    "/",
    "./state.json",
    "ü/ß é",
]


@pytest.fixture(scope="module")
def odd_run_dir(tmp_path_factory, finished_run):
    """A finished run whose first users have IDs with "/", dots, spaces at either end, "<", "?", "#", "%", and
    whose first item's ID begins with a space (`` i0``)."""
    stream = synthetic_stream(n_blocks=2, seed=5)
    stream.user_vocab = np.array([*ODD_USERS, *(f"u{i}" for i in range(len(ODD_USERS), stream.n_users))], dtype=object)
    stream.item_vocab = np.array([" i0", *(f"i{i}" for i in range(1, stream.n_items))], dtype=object)
    return finished_run(tmp_path_factory.mktemp("odd"), stream, OVERRIDES)


def encoded(user: str) -> str:
    """``user`` as one path segment, as the page's script sends it (encodeURIComponent; "." and ".." as %2E)."""
    seg = quote(user, safe="")
    return "%2E" * len(seg) if seg in (".", "..") else seg


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the run that a test may publish new students into."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


class Serving:
    """The application on a free loopback port, served by uvicorn in a thread."""

    def __init__(self, app):
        self.app = app
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the service did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def perturbed_student(rd: RunDir, seed: int):
    """The run's CL_1 with noise on its weights (another ranking, the same universe)."""
    model, meta = rd.load_model("b1_updated", "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std())
    return model, meta


def expected(rd: RunDir, users, k):
    """{user: items} of the version ``state.json`` points to now, by the service's own loader."""
    cfg = rd.load_config()
    v = load_version(rd, rd.open_stream(cfg), rd.read_state())
    return v.id, {u: json.loads(json.dumps(v.recommend(v.user_index(u), k))) for u in users}


# --- answers -------------------------------------------------------------------------------------
def test_answers_equal_ccdrec_recommend(run_dir):
    """The real command on a free port; its answers are the lists `ccdrec recommend` prints."""
    printing = subprocess.Popen(  # side by side with the service's start
        [sys.executable, "-m", "ccdrec", "recommend", str(run_dir), "--user", "3", "-k", "7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with socket_port() as port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccdrec", "serve", str(run_dir), "--port", str(port)], stderr=subprocess.PIPE, text=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        with httpx.Client(base_url=url) as client:
            info = client.get("/model").json()
            state = json.loads((run_dir / "state.json").read_text())
            pt = run_dir / "checkpoints" / f"{state['pointers']['served']}.pt"
            assert info["checkpoint"] == state["pointers"]["served"] and info["block"] == 1
            assert info["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
            assert info["stage"] == "b1/student"  # D_1, served since its teacher cycle (student.serve)
            assert info["loaded_at"] and info["run"] == run_dir.name
            r = client.get("/recommend/3", params={"k": 7})
            assert r.status_code == 200
            body = r.json()
            assert body["model"] == info["id"] and body["user"] == "3" and body["k"] == 7
            out, err = printing.communicate(timeout=120)
            assert printing.returncode == 0, err
            rows = [line.split("\t") for line in out.strip().splitlines()]
            assert [r[1] for r in rows] == [x["item"] for x in body["items"]]
            assert [r[2] for r in rows] == [f"{x['score']:.4f}" for x in body["items"]]
            # the same lists as the library's ServedRun (what `ccdrec recommend` prints), for more users
            served = load_run(run_dir)
            users = [str(u) for u in served.user_ids[::37]]
            for user in users:
                got = client.get(f"/recommend/{user}", params={"k": 10}).json()["items"]
                assert [(x["item"], x["score"]) for x in got] == [(r.item, r.score) for r in served.recommend(user, 10)]
            batch = client.post("/recommend", json={"users": users, "k": 10}).json()
            assert batch["model"] == info["id"] and [x["user"] for x in batch["results"]] == users
            for user, result in zip(users, batch["results"], strict=True):
                assert [(x["item"], x["score"]) for x in result["items"]] == [
                    (r.item, r.score) for r in served.recommend(user, 10)
                ]
    finally:
        proc.terminate()
        proc.wait(20)


class socket_port:
    """A free loopback port number (the socket is closed on exit, for a subprocess to bind)."""

    def __enter__(self):
        self.sock = listen("127.0.0.1", 0)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def wait_healthy(url, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the service did not answer /health")


def test_malformed_inputs_get_the_right_status(run_dir):
    import socket

    app = create_app(run_dir, max_batch=50, max_body=4096, max_batch_items=20_000)
    with Serving(app) as s, httpx.Client(base_url=s.url) as client:
        n_users = s.app.state.slot.current.n_users
        assert client.get("/recommend/3", params={"k": "abc"}).status_code == 422
        assert client.get("/recommend/3", params={"k": "2.5"}).status_code == 422
        assert client.get("/recommend/3", params={"k": 0}).status_code == 422
        assert client.get("/recommend/3", params={"k": 10**30}).status_code == 422
        assert client.get("/recommend/3", params={"k": 1001}).status_code == 422
        assert client.get("/recommend/3", params={"k": "020"}).status_code == 200  # FastAPI's reading of the number
        r = client.get("/recommend/no-such-user")
        assert r.status_code == 404 and r.json()["users"] == n_users and f"{n_users:,} users" in r.json()["detail"]
        long = client.get("/recommend/" + "x" * 5000)
        assert long.status_code == 404 and len(long.text) < 400
        for path in ("..%2F..%2Fconfig.yaml", "..%2Fstate.json", "%2Fetc%2Fpasswd", "%2E%2E", "%00", "..%5C..%5Cstate.json"):
            r = client.get("/recommend/" + path)
            assert r.status_code == 404, path
            assert "dataset" not in r.text and "pointers" not in r.text and "root:" not in r.text
        # paths as a raw client sends them, without URL normalisation
        for raw in (b"/recommend/../../etc/passwd", b"/recommend/..%2f..%2fstate.json", b"/../state.json", b"/recommend/3?k=-1"):
            with socket.create_connection(("127.0.0.1", s.port)) as conn:
                conn.sendall(b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b"".join(iter(lambda: conn.recv(65536), b""))
            status = int(reply.split(b" ", 2)[1])
            assert status in (404, 422), (raw, reply[:200])
            assert b"pointers" not in reply and b"root:" not in reply
        ok = client.post("/recommend", json={"users": ["3"], "k": 3})
        assert ok.status_code == 200
        oversize = client.post("/recommend", json={"users": [str(u) for u in range(51)]})
        assert oversize.status_code == 422  # oversize batch, named, not repeated back
        assert "a list of 51 entries, not repeated" in oversize.text and '"50"' not in oversize.text, oversize.text
        long_key = client.post("/recommend", json={"users": ["3"], "k": 3, "x" * 3000: 1})
        assert long_key.status_code == 422 and len(long_key.text) < 1000, long_key.text[:300]
        many = client.post("/recommend", json={"users": [None] * 40})
        assert many.status_code == 422 and "more error(s), not listed" in many.text and len(many.json()["detail"]) == 21
        assert client.post("/recommend", json={"users": []}).status_code == 422
        too_much = client.post("/recommend", json={"users": ["3"] * 50, "k": 1000})  # 50,000 items > 20,000
        assert too_much.status_code == 422 and "more than 20,000 items" in too_much.text
        assert client.post("/recommend", json={"users": ["3"], "k": 0}).status_code == 422
        for k in (True, "5", 2.0):  # a JSON number for k, as the GET query's k is one: no true for 1, no "5"
            assert client.post("/recommend", json={"users": ["3"], "k": k}).status_code == 422, k
            assert client.post("/recommend/items", json={"items": ["1"], "k": k}).status_code == 422, k
        assert client.post("/recommend", json={"users": [True]}).status_code == 422
        assert client.post("/recommend", json={"users": "3"}).status_code == 422
        assert client.post("/recommend", json={"users": [["3"]]}).status_code == 422
        assert client.post("/recommend", json={"users": ["3"], "extra": 1}).status_code == 422
        assert client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        r = client.post("/recommend", json={"users": ["3", "nobody", "nobody-else"]})
        assert r.status_code == 404 and "2 unknown users" in r.json()["detail"]
        big = json.dumps({"users": ["3"] * 10_000}).encode()
        assert client.post("/recommend", content=big, headers={"content-type": "application/json"}).status_code == 413

        def chunks():
            yield b'{"users": ['
            for _ in range(2000):
                yield b'"3", '
            yield b'"3"]}'

        chunked = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert client.post("/recommend/items", json={"items": []}).status_code == 422
        assert client.post("/recommend/items", json={"items": ["no-such-item"]}).status_code == 404
        assert client.get("/health").json()["status"] == "ok"  # still serving after all of it


def raw_requests(port: int, *requests: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each request sent in turn on one keep-alive connection, as a raw client sends it."""
    import socket

    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        reader = conn.makefile("rb")
        for req in requests:
            conn.sendall(req)
            status = int(reader.readline().split(b" ", 2)[1])
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            out.append((status, reader.read(int(headers[b"content-length"]))))
    return out


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_non_finite_numbers_in_a_body_get_422(run_dir):
    """NaN, Infinity, -Infinity and 1e400 (what Python's JSON reader makes of them) anywhere in a body: a 422
    naming the field, the number echoed as a string, and the keep-alive connection still serves."""
    with Serving(create_app(run_dir, watch=False)) as s, httpx.Client(base_url=s.url) as client:
        cases = [
            ("/recommend", b'{"users":["u5"],"k":1e400}', ["body", "k"], "Infinity"),
            ("/recommend", b'{"users":["u5"],"k":NaN}', ["body", "k"], "NaN"),
            ("/recommend", b'{"users":["u5"],"k":Infinity}', ["body", "k"], "Infinity"),
            ("/recommend", b'{"users":["u5"],"k":-Infinity}', ["body", "k"], "-Infinity"),
            ("/recommend", b'{"users":["u5"],"k":-1e999}', ["body", "k"], "-Infinity"),
            ("/recommend", b'{"users":[NaN],"k":3}', ["body", "users", 0], "NaN"),
            ("/recommend", b'{"users":["u5"],"k":3,"x":NaN}', ["body", "x"], "NaN"),
            ("/recommend", b'{"users":["3"],"k":3,"x":{"y":[1,Infinity]}}', ["body", "x"], {"y": [1, "Infinity"]}),
            ("/recommend/items", b'{"items":["i1"],"k":NaN}', ["body", "k"], "NaN"),
            ("/recommend/items", b'{"items":[Infinity],"k":3}', ["body", "items", 0], "Infinity"),
            ("/recommend/items", b'{"items":["0"],"k":3,"more":-Infinity}', ["body", "more"], "-Infinity"),
        ]
        for path, body, loc, shown in cases:
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422, (body, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json"
            detail = json.loads(r.text, parse_constant=lambda c, b=body: pytest.fail(f"{c} in the answer to {b}"))["detail"]
            errors = [e for e in detail if e["loc"][: len(loc)] == loc]
            assert errors, (body, detail)
            assert all(e["input"] == shown and e["msg"] for e in errors), (body, errors)
            assert client.get("/health").status_code == 200  # the same keep-alive connection
        # several on one raw keep-alive connection: every answer comes, none resets the connection
        answers = raw_requests(
            s.port,
            post("/recommend", b'{"users":["3"],"k":NaN}'),
            post("/recommend/items", b'{"items":[Infinity],"k":3}'),
            post("/recommend", b'{"users":["3"],"k":1e400}'),
            post("/recommend", b'{"users":["3"],"k":2}'),
            b"GET /recommend/3?k=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        assert [status for status, _ in answers] == [422, 422, 422, 200, 200]
        assert json.loads(answers[0][1])["detail"][0]["loc"] == ["body", "k"]
        assert json.loads(answers[3][1])["results"][0]["items"] == json.loads(answers[4][1])["items"]


def test_every_user_id_is_reachable_by_get(odd_run_dir):
    """IDs with "/", dots, spaces at either end, "?", "#", "%": GET with the percent-encoded ID answers what POST
    /recommend and `ccdrec recommend` do (by the fast path and by the route); unknown ones get the service's 404."""
    served = load_run(odd_run_dir)
    assert [str(u) for u in served.user_ids[: len(ODD_USERS)]] == ODD_USERS
    with Serving(create_app(odd_run_dir, watch=False)) as s, httpx.Client(base_url=s.url) as client:
        n_users = s.app.state.slot.current.n_users
        for user in [*ODD_USERS, "u20"]:
            want = [(r.item, r.score) for r in served.recommend(user, 5)]
            batch = client.post("/recommend", json={"users": [user], "k": 5}).json()["results"][0]
            assert batch["user"] == user and [(x["item"], x["score"]) for x in batch["items"]] == want
            for query in ("k=5", "k=05"):  # plain digits: the fast path; "05": FastAPI's route
                r = client.get(f"/recommend/{encoded(user)}?{query}")
                assert r.status_code == 200, (user, query, r.text)
                body = r.json()
                assert body["user"] == user and body["k"] == 5, (user, query)
                assert [(x["item"], x["score"]) for x in body["items"]] == want, (user, query)
        default = client.get("/recommend/" + encoded(" padded "))
        assert default.status_code == 200 and default.json()["k"] == 20
        # unknown IDs, some of them near a known one or naming a file of the run: the service's own 404
        for user in ("padded", " padded", "a/b/", "a", "a%2Fb", "../state.json", "../../config.yaml", "...", "/etc/passwd", ""):
            for query in ("", "?k=5", "?k=05"):
                r = client.get("/recommend/" + encoded(user) + query)
                assert r.status_code == 404, (user, query, r.text)
                assert r.json()["users"] == n_users and "unknown user" in r.json()["detail"], (user, r.text)
                assert "pointers" not in r.text and "root:" not in r.text and "dataset" not in r.text
        # as a raw client sends them: %2E and %2e for "." and "..", and a literal "/" of the ID
        answers = raw_requests(
            s.port,
            *(
                b"GET /recommend/" + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
                for path in (b"%2E?k=3", b"%2e%2E?k=3", b"a/b?k=3", b"a%2fb?k=3", b"..%2F..%2Fetc%2Fpasswd", b"..%2Fstate.json")
            ),
        )
        users = [json.loads(body).get("user") for _, body in answers]
        assert [status for status, _ in answers] == [200, 200, 200, 200, 200, 404]
        assert users == [".", "..", "a/b", "a/b", "../../etc/passwd", None]
        assert b"pointers" not in answers[-1][1] and json.loads(answers[-1][1])["users"] == n_users
        assert client.get("/health").status_code == 200


def test_cold_start_from_items(run_dir):
    with Serving(create_app(run_dir)) as s, httpx.Client(base_url=s.url) as client:
        v = s.app.state.slot.current
        given = v.item_names[:3]
        r = client.post("/recommend/items", json={"items": given, "k": 10})
        assert r.status_code == 200
        body = r.json()
        assert body["model"] == v.id and len(body["items"]) == 10
        assert not set(given) & {x["item"] for x in body["items"]}
        scores = [x["score"] for x in body["items"]]
        assert scores == sorted(scores, reverse=True)
        # the same list as load_run(...).recommend_for_items and `ccdrec recommend --items` (entity initialisation)
        expected = load_run(run_dir).recommend_for_items(given, 10)
        assert [(x["item"], x["score"]) for x in body["items"]] == [(r.item, r.score) for r in expected.items]
        assert body["unknown"] == []
        partial = client.post("/recommend/items", json={"items": [*given, "no-such-item"], "k": 10}).json()
        assert partial["unknown"] == ["no-such-item"] and partial["items"] == body["items"]
        # an ID with spaces around it is found as load_run and `ccdrec recommend --items` find it: alone it
        # was a 404, beside a known item an answer
        alone = client.post("/recommend/items", json={"items": [f" {given[0]} "], "k": 10})
        assert alone.status_code == 200 and alone.json()["unknown"] == []
        assert alone.json()["items"] == client.post("/recommend/items", json={"items": [given[0]], "k": 10}).json()["items"]


def test_a_user_of_a_later_block_gets_the_cli_detail(run_copy):
    """Served at block 0, a user of block 1 is a 404 that says where the user first appears, in the words
    of ``ccdrec recommend`` (:meth:`ServedRun.user_index`), with the blocks as fields; a plain unknown user
    gets neither."""
    state = json.loads((run_copy / "state.json").read_text())
    state["block"] = 0
    state["pointers"].update(served="b0_student", student="b0_student")
    (run_copy / "state.json").write_text(json.dumps(state))
    served = load_run(run_copy)
    stream = served.stream
    later = str(stream.user_vocab[stream[0].n_users]) if stream.user_vocab is not None else str(stream[0].n_users)
    with pytest.raises(CcdrecError) as cli_error:
        served.user_index(later)
    assert "first appears in block 1 of the stream, and the served student has reached block 0" in str(cli_error.value)
    with Serving(create_app(run_copy, watch=False)) as s, httpx.Client(base_url=s.url) as client:
        r = client.get(f"/recommend/{encoded(later)}", params={"k": 5})
        assert r.status_code == 404
        assert r.json() == {"detail": str(cli_error.value), "users": stream[0].n_users, "first_block": 1, "block": 0}
        batch = client.post("/recommend", json={"users": [later, "nobody"], "k": 3})
        assert batch.status_code == 404 and batch.json()["first_block"] == 1
        assert batch.json()["detail"].startswith(f"2 unknown users, e.g. {later!r}") and "first appears in block 1" in batch.text
        plain = client.get("/recommend/nobody")
        assert plain.status_code == 404 and "first appears" not in plain.text and "first_block" not in plain.json()
        assert client.get("/recommend/3", params={"k": 2}).status_code == 200
        # one string where a list of item IDs is expected stays a 422, as in the Python API (a TypeError)
        assert client.post("/recommend/items", json={"items": "242"}).status_code == 422


def test_openapi_schema_documents_the_endpoints(run_dir):
    app = create_app(run_dir, watch=False)
    schema = app.openapi()
    assert {"/recommend/{user}", "/recommend", "/recommend/items", "/health", "/model", "/"} <= set(schema["paths"])
    k = next(p for p in schema["paths"]["/recommend/{user}"]["get"]["parameters"] if p["name"] == "k")
    assert k["schema"]["minimum"] == 1 and k["schema"]["maximum"] == 1000
    assert "404" in schema["paths"]["/recommend/{user}"]["get"]["responses"]


def test_teacher_ensemble_is_served_the_same_way(run_dir):
    with Serving(create_app(run_dir, role="teacher", watch=False)) as s, httpx.Client(base_url=s.url) as client:
        body = client.get("/recommend/3", params={"k": 5}).json()
        assert body["model"].startswith("b1_teacher0+b1_teacher1@") and len(body["items"]) == 5
        assert client.get("/model").json()["role"] == "teacher"
        assert client.post("/recommend/items", json={"items": ["1"]}).status_code == 501


# --- hot swap ------------------------------------------------------------------------------------
def test_hot_swap_under_load_fails_no_request(run_copy, caplog):
    """Clients query without pause while three new students and one truncated checkpoint are published:
    no request fails, every answer names a published version and equals that version's answer."""
    rd = RunDir(run_copy)
    users = ["0", "3", "17", "101", "217"]
    versions = dict([expected(rd, users, 10)])
    app = create_app(run_copy, poll_seconds=0.05)
    stop, answers, failures = threading.Event(), [], []

    def client_loop():
        with httpx.Client(base_url=s.url, timeout=10) as client:
            i = 0
            while not stop.is_set():
                user = users[i % len(users)]
                i += 1
                try:
                    r = client.get(f"/recommend/{user}", params={"k": 10})
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    else:
                        answers.append((user, r.json()))
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    with Serving(app) as s:
        clients = [threading.Thread(target=client_loop) for _ in range(4)]
        for t in clients:
            t.start()
        slot = app.state.slot
        try:
            for n in range(1, 4):
                time.sleep(0.3)
                model, meta = perturbed_student(rd, n)
                publish(rd, model, f"b1_served_v{n}", block=meta["block"])
                vid, exp = expected(rd, users, 10)
                versions[vid] = exp
                wait_for(lambda vid=vid: slot.current.id == vid)
            # a checkpoint cut short: refused, the last version keeps serving
            model, meta = perturbed_student(rd, 99)
            rd.save_model("b1_served_torn", model, meta)
            pt = rd.ckpt("b1_served_torn").with_suffix(".pt")
            pt.write_bytes(pt.read_bytes()[:100])
            with caplog.at_level("WARNING", logger="ccdrec.service"):
                point(rd, {"served": "b1_served_torn"})
                wait_for(lambda: len(slot.refused) == 1)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in clients:
                t.join(10)
        info = httpx.get(s.url + "/model").json()
    assert not failures, failures[:5]
    seen_models = {body["model"] for _, body in answers}
    assert seen_models <= set(versions) and len(seen_models) == 4, seen_models
    for user, body in answers:
        assert body["items"] == versions[body["model"]][user], body["model"]
    assert info["swaps"] == 3 and [h["id"] for h in info["history"]] == list(versions)
    assert info["id"] == list(versions)[-1] and "b1_served_torn" in info["refused"][0]["target"]
    assert any("refused b1_served_torn" in r.getMessage() and "still serving" in r.getMessage() for r in caplog.records)


def wait_for(cond, timeout=20.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("serve", ["distilled", "update"])
def test_a_completed_student_stage_is_swapped_in(tmp_path, serve):
    """The run itself, resumed stage by stage: the service follows the served pointer of state.json (D_1
    once block 1's teacher cycle has distilled it, unless ``student.serve = update``)."""
    from ccdrec.pipeline.staged import StopRequested

    save_stream(synthetic_stream(n_blocks=2, seed=4), tmp_path / "stream")
    cfg = load_config(str(tmp_path / "stream"), preset="quick", overrides=[*OVERRIDES, f"student.serve={serve}"])
    with pytest.raises(StopRequested):
        run_stream(cfg, tmp_path / "run", progress=False, stop_after="b0/eval")
    rd = RunDir(tmp_path / "run")
    stream = rd.open_stream(cfg)
    slot = ModelSlot(load_version(rd, stream, rd.read_state()))
    watcher = RunWatcher(slot, rd, stream)
    assert slot.current.id.startswith("b0_student@") and slot.current.stage == "b0/student"
    with pytest.raises(StopRequested):
        run_stream(None, rd.path, resume=True, progress=False, stop_after="b1/student_update")
    assert watcher.check() and slot.current.id.startswith("b1_updated@")
    assert (slot.current.block, slot.current.stage) == (1, "b1/student_update")
    run_stream(None, rd.path, resume=True, progress=False)  # teacher updates, D_1, evaluation
    report = (rd.path / "report.md").read_text()
    assert f"student.serve: {serve}" in report  # the report says which student its served rows are
    if serve == "update":  # CL_1 stays served
        assert not watcher.check() and slot.swaps == 1
    else:
        assert watcher.check() and slot.current.id.startswith("b1_student@") and slot.swaps == 2
        assert (slot.current.block, slot.current.stage) == (1, "b1/student")


def test_the_watcher_refuses_what_may_not_serve(run_copy, caplog):
    rd = RunDir(run_copy)
    cfg = rd.load_config()
    stream = rd.open_stream(cfg)
    slot = ModelSlot(load_version(rd, stream, rd.read_state()))
    watcher = RunWatcher(slot, rd, stream)
    first, orig = slot.current.id, rd.read_state()
    assert not watcher.check()  # nothing new
    caplog.set_level("WARNING", logger="ccdrec.service")

    model, meta = perturbed_student(rd, 1)
    with torch.no_grad():
        model.user_emb[0, 0] = float("nan")
    publish(rd, model, "b1_nan", block=1)
    assert not watcher.check() and slot.current.id == first
    assert "non-finite" in slot.refused[-1]["reason"]

    model, meta = perturbed_student(rd, 2)
    publish(rd, model, "b1_block0_universe", block=0)  # the universe of block 1 claimed for block 0
    assert not watcher.check() and "universe" in slot.refused[-1]["reason"]

    point(rd, {"served": "b1_missing"})
    assert not watcher.check() and slot.current.id == first
    n_refused = len(slot.refused)
    assert not watcher.check() and len(slot.refused) == n_refused  # the same target is not tried again

    (run_copy / "state.json").write_text("{torn")
    assert not watcher.check() and slot.current.id == first

    model, meta = perturbed_student(rd, 3)
    rd.save_model("b1_good", model, meta)
    rd.write_state({**orig, "pointers": {**orig["pointers"], "served": "b1_good"}})
    assert watcher.check() and slot.current.id.startswith("b1_good@") and slot.swaps == 1
    assert any("refused b1_nan" in r.getMessage() for r in caplog.records)


# --- startup errors ------------------------------------------------------------------------------
def test_numeric_options_of_serve_are_checked(run_dir):
    """NaN, infinities, 0, negatives and values out of range: a one-line error, exit 2, nothing served."""
    bad = [
        ("--poll", "nan", "--poll"),
        ("--poll", "NaN", "--poll"),
        ("--poll", "inf", "--poll"),
        ("--poll", "-inf", "--poll"),
        ("--poll", "1e400", "--poll"),
        ("--poll", "0", "--poll"),
        ("--poll", "-1", "--poll"),
        ("--poll", "1e12", "--poll"),
        ("--threads", "0", "--threads"),
        ("--threads", "-3", "--threads"),
        ("--threads", "100000", "--threads"),
        ("--port", "70000", "--port"),
        ("--port", "-1", "--port"),
    ]
    procs = [
        subprocess.Popen([sys.executable, "-m", "ccdrec", "serve", str(run_dir), opt, value], stderr=subprocess.PIPE, text=True)
        for opt, value, _ in bad
    ]
    for (opt, value, named), proc in zip(bad, procs, strict=True):
        try:
            code, err = proc.wait(120), proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 2, (opt, value, code, err)
        assert err.startswith("error: ") and err.strip().count("\n") == 0 and named in err and "Traceback" not in err, err


def test_startup_mistakes_are_one_line_errors(run_dir, tmp_path):
    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "ccdrec", *args], stderr=subprocess.PIPE, text=True)

    with socket_port() as port:
        busy = listen("127.0.0.1", port)
        busy.listen()
        try:
            missing, taken = start("serve", str(tmp_path / "nope")), start("serve", str(run_dir), "--port", str(port))
            outcomes = [(p.wait(120), p.stderr.read()) for p in (missing, taken)]
        finally:
            busy.close()
    (code, err), (code_taken, err_taken) = outcomes
    assert code == 2 and err.strip().count("\n") == 0 and "no such run directory" in err and "Traceback" not in err
    assert code_taken == 2 and err_taken.strip().count("\n") == 0 and "already in use" in err_taken

    changed = tmp_path / "changed"
    shutil.copytree(run_dir, changed)
    record = json.loads((changed / "stream.json").read_text())
    (changed / "stream.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    with pytest.raises(CcdrecError, match="has changed since the run started"):
        create_app(changed)

    empty = tmp_path / "empty"
    shutil.copytree(run_dir, empty)
    state = json.loads((empty / "state.json").read_text())
    (empty / "state.json").write_text(json.dumps({**state, "pointers": {}}))
    with pytest.raises(CcdrecError, match="no student yet"):
        create_app(empty)


# --- the page in a real browser ------------------------------------------------------------------
def chromium_paths():
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    return browser, shutil.which("chromedriver")


def test_page_in_a_headless_browser(run_copy):
    browser, driver_path = chromium_paths()
    if browser is None or driver_path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium and chromedriver (.ci/run installs Debian's chromium, chromium-driver)")
        pytest.skip("no chromium / chromedriver here (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1600"):
        options.add_argument(arg)
    rd = RunDir(run_copy)
    app = create_app(run_copy, poll_seconds=0.1)
    with Serving(app) as s:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        try:
            wait = WebDriverWait(driver, 20)
            driver.get(s.url + "/")
            v = app.state.slot.current
            assert driver.find_element(By.ID, "run").text == run_copy.name
            assert driver.find_element(By.ID, "model-id").text == v.id
            assert driver.find_element(By.ID, "model-stage").text == "b1/student"  # D_1 (student.serve)
            summary = driver.find_element(By.ID, "summary-table").text
            for name in ("teacher ensemble E_k", "served student", "distilled student D_k", "student update CL_k"):
                assert name in summary
            assert "H recall@20" in summary
            assert len(driver.find_elements(By.CSS_SELECTOR, "#block-plot polyline.series")) == 4

            driver.find_element(By.ID, "user").send_keys("3")
            k = driver.find_element(By.ID, "k")
            k.clear()
            k.send_keys("5")
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 5)
            shown = [
                row.find_elements(By.TAG_NAME, "td")[1].text for row in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
            ]
            assert shown == [x["item"] for x in httpx.get(s.url + "/recommend/3", params={"k": 5}).json()["items"]]
            assert v.id in driver.find_element(By.ID, "answered-by").text

            user = driver.find_element(By.ID, "user")
            user.clear()
            user.send_keys("nobody")
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
            assert (
                "404" in driver.find_element(By.ID, "error").text and "unknown user" in driver.find_element(By.ID, "error").text
            )
            assert not driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")

            model, meta = perturbed_student(rd, 7)
            publish(rd, model, "b1_served_page", block=meta["block"])
            wait.until(lambda d: d.find_element(By.ID, "model-id").text.startswith("b1_served_page@"))
            assert driver.find_element(By.ID, "model-swaps").text == "1"
        finally:
            driver.quit()


def test_page_form_asks_for_the_id_as_typed(odd_run_dir):
    """The form sends the ID untrimmed and encoded: "/", ".", "..", spaces at either end, markup all reach their
    user; "padded" without its spaces is another, unknown user."""
    browser, driver_path = chromium_paths()
    if browser is None or driver_path is None:
        pytest.skip("no chromium / chromedriver here (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    served = load_run(odd_run_dir)
    with Serving(create_app(odd_run_dir, watch=False)) as s:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        try:
            wait = WebDriverWait(driver, 20)
            driver.get(s.url + "/")
            for user in (" padded ", "a/b", ".", "..", "../../etc/passwd", "<script>alert(1)</script>", "x?y#z&k=1%2F+"):
                field = driver.find_element(By.ID, "user")
                field.clear()
                field.send_keys(user)
                k = driver.find_element(By.ID, "k")
                k.clear()
                k.send_keys("4")
                driver.find_element(By.ID, "submit").click()
                answered = f"user {user}, top 4, answered by"
                wait.until(lambda d, a=answered: d.find_element(By.ID, "answered-by").get_attribute("textContent").startswith(a))
                rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
                shown = [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows]
                assert shown == [r.item for r in served.recommend(user, 4)], user
                assert driver.find_element(By.ID, "error").is_displayed() is False
            field = driver.find_element(By.ID, "user")
            field.clear()
            field.send_keys("padded")
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
            assert "404" in driver.find_element(By.ID, "error").text and "'padded'" in driver.find_element(By.ID, "error").text
        finally:
            driver.quit()


def test_an_item_id_is_looked_up_as_written_everywhere_then_without_surrounding_spaces(odd_run_dir):
    """`recommend --items` stripped every ID, so " i0" (an ID that begins with a space) could not be asked
    for from the command line, though load_run and the HTTP service found it."""
    served = load_run(odd_run_dir)
    assert served.item_index(" i0") == 0 and served.item_index("i0") is None and served.item_index(" i1 ") == 1
    expected = served.recommend_for_items([" i0", "i1"], 5)
    assert expected.used == [" i0", "i1"] and expected.unknown == []
    cmd = [sys.executable, "-m", "ccdrec", "recommend", str(odd_run_dir), "--items", " i0, i1", "-k", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert [line.split("\t")[1] for line in out.stdout.strip().splitlines()] == [r.item for r in expected.items]
    with Serving(create_app(odd_run_dir, watch=False)) as s, httpx.Client(base_url=s.url) as client:
        r = client.post("/recommend/items", json={"items": [" i0", " i1"], "k": 5})
        assert r.status_code == 200 and [x["item"] for x in r.json()["items"]] == [r.item for r in expected.items]
