"""Load and faults: ``ccdrec serve`` under concurrent clients while newer models are swapped in.

    python benchmarks/serve_load.py RUN                      # the student, then the teacher ensemble
    python benchmarks/serve_load.py RUN --model student --requests 30000 --clients 32 --swaps 10 -k 20

Loopback only, bounded in count (``--requests``) and time (``--max-seconds``) per model. For each model
(``student``: the served student, ``teacher``: the teacher ensemble served the same way, ``--teacher``):

1. RUN is never written: its configuration, stream record, state and metrics are copied, and the
   checkpoints its state points to hard-linked, into a temporary run directory;
2. ``--swaps`` new versions are written there as checkpoints: the served student (every teacher member)
   with Gaussian noise of 5% of each tensor's standard deviation added (seed = version number); this
   process loads each version with the service's own loader and computes its answer for every user of
   the request pool (``--pool`` users drawn at random from the universe);
3. ``python -m ccdrec serve COPY --port P`` starts (``--teacher`` for the teacher) and /health answers;
4. after a warm-up, ``--clients`` keep-alive HTTP/1.1 connections (an asyncio protocol; uvloop when
   installed) each send ``GET /recommend/{user}?k=K`` as soon as their previous answer has arrived,
   users cycling through the pool, until ``--requests`` answers. After every requests/(swaps+1)
   answers ``state.json`` is pointed at the next version (:func:`ccdrec.service.swap.point`, the last
   write of a completed stage); after the last swap, a fault: a checkpoint truncated to half its size;
5. every answer is checked against the expected answer of the version it names.

Prints, per model, ``name: value`` lines:

* ``requests``, ``errors`` (transport errors and non-200 answers), ``rps`` (answers / wall seconds of
  the load), ``p50_ms`` / ``p99_ms`` (client-side latency, request written to answer read);
* ``swaps`` (versions that answered, after the first; ``swaps_service``: the service's own count),
  ``requests_during_swaps`` (requests in flight while a swap was under way: from the ``state.json``
  write to the first answer naming the new version), ``swap_ms_median`` (that window's length: the
  poll interval plus the load of the new version);
* ``mismatches`` (answers that differ from the expected answer of the version they name: what a
  half-loaded model would give), ``unknown_versions`` (answers naming a version never published),
  ``refused`` (faults the service refused; expected 1);
* ``peak_rss_mb`` (the service's peak resident memory, VmHWM), ``load_avg`` (1-minute load average
  just before the load, from other processes too), ``cpu_s_service`` / ``cpu_s_clients``.

With both models, ``teacher/student rps`` and ``teacher/student p99`` end the output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ccdrec.errors import CcdrecError
from ccdrec.pipeline.rundir import RunDir
from ccdrec.service.swap import point
from ccdrec.service.version import load_version, role_pointers

COPIED = ("config.yaml", "stream.json", "state.json", "metrics.jsonl")


def copy_run(src: Path, dst: Path, role: str, n_members: int) -> RunDir:
    """A run directory at ``dst`` with ``src``'s records and the checkpoints of ``role`` (hard links)."""
    rd_src = RunDir.open(src)
    state = rd_src.read_state()
    (dst / "checkpoints").mkdir(parents=True)
    for name in COPIED:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    for name in role_pointers(state, role, n_members):
        for suffix in (".pt", ".json"):
            a, b = rd_src.ckpt(name).with_suffix(suffix), dst / "checkpoints" / f"{name}{suffix}"
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)
    return RunDir(dst)


def perturbed(rd: RunDir, name: str, seed: int):
    """Checkpoint ``name`` with N(0, (0.05 std)^2) noise added to every floating tensor; (model, meta)."""
    model, meta = rd.load_model(name, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    return model, meta


def write_versions(rd: RunDir, role: str, n_members: int, swaps: int) -> list[dict[str, str]]:
    """Write ``swaps`` perturbed versions; returns the pointer updates that publish each, in order."""
    state = rd.read_state()
    names = role_pointers(state, role, n_members)
    if role == "student":
        roles = ["served" if "served" in state["pointers"] else "student"]
    else:
        roles = [f"teacher{m}" for m in range(n_members)]
    out = []
    for i in range(1, swaps + 1):
        update = {}
        for r, name in zip(roles, names, strict=True):
            model, meta = perturbed(rd, name, seed=i * 100 + len(update))
            new = f"bench_v{i}_{r}"
            rd.save_model(new, model, meta)
            update[r] = new
        out.append(update)
    return out


def write_fault(rd: RunDir, role: str, n_members: int) -> dict[str, str]:
    """A checkpoint truncated to half its size (as if a writer died half-way); the pointer update."""
    state = rd.read_state()
    names = role_pointers(state, role, n_members)
    r = ("served" if "served" in state["pointers"] else "student") if role == "student" else "teacher0"
    model, meta = rd.load_model(names[0], "cpu")
    rd.save_model("bench_fault", model, meta)
    pt = rd.ckpt("bench_fault").with_suffix(".pt")
    data = pt.read_bytes()
    pt.write_bytes(data[: len(data) // 2])
    return {r: "bench_fault"}


def expected_answers(rd: RunDir, stream, role: str, n_members: int, exact_top, updates, pool: list[str], k: int) -> dict:
    """{version id: {user: items}} of the initial version and every update, by the service's loader."""
    import orjson

    out = {}
    state = rd.read_state()
    for update in [{}, *updates]:
        st = {**state, "pointers": {**state["pointers"], **update}}
        v = load_version(rd, stream, st, role, exact_top, n_members)
        # through JSON, as the client sees it
        out[v.id] = {u: orjson.loads(orjson.dumps(v.recommend(v.user_index(u), k))) for u in pool}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_service(run: Path, port: int, role: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ccdrec", "serve", str(run), "--port", str(port)] + (["--teacher"] if role == "teacher" else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise CcdrecError(f"the service did not start: {proc.stderr.read().strip()}")
        try:
            if http_get(port, "/health", 1.0)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise CcdrecError("the service did not answer /health within 120 s")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Load:
    """The clients: ``clients`` keep-alive connections, each with one request in flight at a time."""

    def __init__(self, port: int, pool: list[str], k: int, total: int, max_seconds: float, on_answer=None):
        self.port, self.pool, self.k, self.total, self.max_seconds = port, pool, k, total, max_seconds
        self.sent = 0
        self.records: list[tuple[float, float, int, str, bytes]] = []  # (start, end, status, user, body)
        self.errors = 0
        self.on_answer = on_answer or (lambda n: None)
        self.deadline = 0.0

    def next_request(self) -> tuple[str, bytes] | None:
        if self.sent >= self.total or time.perf_counter() > self.deadline:
            return None
        user = self.pool[self.sent % len(self.pool)]
        self.sent += 1
        return user, f"GET /recommend/{user}?k={self.k} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    async def run(self, clients: int) -> float:
        loop = asyncio.get_running_loop()
        done = [loop.create_future() for _ in range(clients)]
        self.deadline = time.perf_counter() + self.max_seconds
        start = time.perf_counter()
        for fut in done:
            await loop.create_connection(lambda fut=fut: Client(self, fut), "127.0.0.1", self.port)
        await asyncio.gather(*done)
        return time.perf_counter() - start


class Client(asyncio.Protocol):
    def __init__(self, load: Load, done: asyncio.Future):
        self.load, self.done, self.buf = load, done, b""
        self.user, self.t0 = "", 0.0

    def connection_made(self, transport):
        self.transport = transport
        self.send()

    def send(self):
        nxt = self.load.next_request()
        if nxt is None:
            self.transport.close()
            return
        self.user, request = nxt
        self.t0 = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes):
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1").split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in head[1:] if h.lower().startswith("content-length:")), 0)
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4 : head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length :]
            status = int(head[0].split()[1])
            self.load.records.append((self.t0, time.perf_counter(), status, self.user, body))
            self.load.on_answer(len(self.load.records))
            self.send()

    def connection_lost(self, exc):
        if exc is not None or self.load.sent < self.load.total and time.perf_counter() <= self.load.deadline:
            self.load.errors += 1
        if not self.done.done():
            self.done.set_result(None)


def run_model(args, role: str) -> dict:
    import orjson

    src = Path(args.run)
    rd_src = RunDir.open(src)
    cfg = rd_src.load_config()
    n_members, exact_top = len(cfg.teacher.members), cfg.teacher.ensemble_exact_top
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-", dir=args.tmp))
    try:
        rd = copy_run(src, tmp / src.name, role, n_members)
        stream = rd.open_stream(cfg)
        updates = write_versions(rd, role, n_members, args.swaps)
        fault = write_fault(rd, role, n_members)
        first = load_version(rd, stream, rd.read_state(), role, exact_top, n_members)
        rng = np.random.default_rng(0)
        pool_size = args.pool if role == "student" else args.teacher_pool
        pool = [str(first.run.user_ids[i]) for i in rng.choice(first.n_users, min(pool_size, first.n_users), replace=False)]
        t = time.time()
        expected = expected_answers(rd, stream, role, n_members, exact_top, updates, pool, args.k)
        print(f"# {role}: {len(expected)} versions x {len(pool)} users expected in {time.time() - t:.1f} s", file=sys.stderr)
        del first
        port = free_port()
        proc = start_service(rd.path, port, role)
        try:
            return drive(args, role, rd, proc, port, pool, updates, fault, expected, orjson)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drive(args, role, rd, proc, port, pool, updates, fault, expected, orjson) -> dict:
    total = args.requests if role == "student" else args.teacher_requests
    warm = Load(port, pool, args.k, min(1000, total), args.max_seconds)
    asyncio_run(warm.run(args.clients))
    step = total // (len(updates) + 2)
    published: list[tuple[float, str]] = []  # (time the state write began, pointer target) per swap
    pending = list(updates) + [fault]
    landed = {"waiting": None, "since": 0.0, "next_at": step}
    loop_ref = {}

    def on_answer(n: int):
        # swap i at answer i * step, but never before the previous version answers (or 10 s passed)
        waiting = landed["waiting"]
        if waiting is not None:
            if waiting in load.records[-1][4] or time.perf_counter() - landed["since"] > 10:
                landed["waiting"] = None
            return
        if pending and n >= landed["next_at"]:
            update = pending.pop(0)
            target = "+".join(update.values())
            published.append((time.perf_counter(), target))
            landed["waiting"] = f'"model":"{target}@'.encode() if update is not fault else None
            landed["since"], landed["next_at"] = time.perf_counter(), n + step
            loop_ref["loop"].run_in_executor(None, point, rd, update)

    load = Load(port, pool, args.k, total, args.max_seconds, on_answer)
    load_avg = os.getloadavg()[0]
    cpu0, cpu_client0 = cpu_seconds(proc.pid), time.process_time()

    async def main():
        loop_ref["loop"] = asyncio.get_running_loop()
        return await load.run(args.clients)

    wall = asyncio_run(main())
    cpu_service, cpu_clients = cpu_seconds(proc.pid) - cpu0, time.process_time() - cpu_client0
    time.sleep(max(1.0, 3 * 0.5))  # let a last swap or refusal land before asking /model
    info = orjson.loads(http_get(port, "/model")[1])
    rss = peak_rss_mb(proc.pid)

    recs = load.records
    lat = np.array([e - s for s, e, *_ in recs]) * 1e3
    errors = load.errors + sum(1 for r in recs if r[2] != 200)
    mismatches = unknown = 0
    models = []
    for _, e, status, user, body in recs:
        if status != 200:
            continue
        ans = orjson.loads(body)
        models.append((e, ans["model"]))
        exp = expected.get(ans["model"])
        if exp is None:
            unknown += 1
        elif exp[user] != ans["items"]:
            mismatches += 1
    models.sort()
    changes = len({m for _, m in models}) - 1  # versions that answered after the first
    windows = []
    ids_by_target = {vid.split("@")[0]: vid for vid in expected}
    for t0, target in published:
        vid = ids_by_target.get(target)
        first_new = next((e for e, m in models if m == vid and e >= t0), None) if vid else None
        if first_new is not None:
            windows.append((t0, first_new))
    during = sum(1 for s, e, *_ in recs if any(s <= w1 and e >= w0 for w0, w1 in windows))
    return {
        "model": role,
        "requests": len(recs),
        "errors": errors,
        "rps": round(len(recs) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else float("nan"),
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else float("nan"),
        "swaps": changes,
        "swaps_service": info["swaps"],
        "requests_during_swaps": during,
        "swap_ms_median": round(statistics.median([(w1 - w0) * 1e3 for w0, w1 in windows]), 1) if windows else float("nan"),
        "mismatches": mismatches,
        "unknown_versions": unknown,
        "refused": len(info["refused"]),
        "peak_rss_mb": round(rss, 1),
        "load_avg": round(load_avg, 2),
        "cpu_s_service": round(cpu_service, 2),
        "cpu_s_clients": round(cpu_clients, 2),
        "clients": args.clients,
        "k": args.k,
    }


def asyncio_run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory of `ccdrec run` (not modified)")
    ap.add_argument("--model", choices=["student", "teacher", "both"], default="both")
    ap.add_argument("--requests", type=int, default=100_000, help="answers to collect from the student")
    ap.add_argument("--teacher-requests", type=int, default=20_000, help="answers to collect from the teacher ensemble")
    ap.add_argument("--clients", type=int, default=32, help="concurrent keep-alive connections")
    ap.add_argument("--swaps", type=int, default=10, help="new versions published during the load")
    ap.add_argument("-k", type=int, default=20, help="recommendation list length")
    ap.add_argument("--pool", type=int, default=1000, help="users the student's requests cycle through")
    ap.add_argument("--teacher-pool", type=int, default=200, help="users the teacher's requests cycle through")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="stop sending after this long (per model)")
    ap.add_argument("--tmp", default=None, help="directory for the temporary run copy (default: the system's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    roles = ["student", "teacher"] if args.model == "both" else [args.model]
    results = {}
    try:
        for role in roles:
            results[role] = res = run_model(args, role)
            for key, value in res.items():
                print(f"{key}: {value}", flush=True)
    except CcdrecError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if len(results) == 2:
        s, t = results["student"], results["teacher"]
        print(f"teacher/student rps: {t['rps'] / s['rps']:.3f}")
        print(f"teacher/student p99: {t['p99_ms'] / s['p99_ms']:.2f}")


if __name__ == "__main__":
    main()
