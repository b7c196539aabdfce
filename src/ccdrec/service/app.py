"""The FastAPI application of ``ccdrec serve`` (FastAPI and orjson are imported inside :func:`create_app`).

Endpoints (JSON unless said; every recommendation answer names the model version that computed it,
``model`` = ``CHECKPOINT@SHA12``, see :mod:`ccdrec.service.version`):

* ``GET /recommend/{user}?k=20`` -> ``{"user", "k", "model", "items": [{"item", "score"}, ...]}``: the
  top-k items of an original user ID, best first, the user's seen items excluded: the list
  ``ccdrec recommend RUN --user USER -k K`` prints; ``user`` is the ID percent-encoded as one path
  segment (``encodeURIComponent``: ``/`` as ``%2F``; an ID ``.`` or ``..`` as ``%2E``, ``%2E%2E``) and is
  looked up exactly, spaces included;
* ``POST /recommend`` with ``{"users": [...], "k": 20}`` (1..``max_batch`` user IDs) ->
  ``{"k", "model", "results": [{"user", "items"}, ...]}``, the whole batch from one version;
* ``POST /recommend/items`` with ``{"items": [...], "k": 20}`` (1..``max_items`` original item IDs) ->
  ``{"k", "model", "items", "unknown"}``: a user known only by the items they just interacted with (cold
  start by entity initialisation, :meth:`ccdrec.serve.ServedRun.recommend_for_items`, the same list as
  ``ccdrec recommend RUN --items``), those items excluded; ``unknown`` lists the given IDs that are not in
  the universe (404 when none is);
* ``GET /health`` -> ``{"status": "ok", "model"}``; ``GET /model`` -> the serving version (``id``,
  ``role``, ``run``, ``checkpoint``, ``sha256``, ``block``, ``stage``, ``loaded_at``, universe size),
  ``swaps`` (count), ``history`` (the last versions, oldest first) and ``refused`` (the last refusals);
* ``GET /``: the HTML page (:mod:`ccdrec.service.page`); ``/openapi.json`` and ``/docs`` as FastAPI makes them.

Errors are JSON ``{"detail": ...}``: 404 for an unknown user (with ``users``, the universe size; for a user of a
block the served model has not reached yet, also ``first_block``, the block it first appears in, and ``block``, the
block reached, both named in ``detail`` as ``ccdrec recommend`` names them) or
unknown items, none of them known (with ``unknown``, the first 10, and ``items``, the universe size); 422 when k is not an
integer in 1..``max_k``, a list is empty or too long, a batch asks for more than ``max_batch_items``
(users x k), or a body is not the documented JSON (FastAPI's
list of validation errors, a non-finite number in the body such as ``NaN`` or ``1e400`` echoed as the
string ``"NaN"`` / ``"Infinity"``); 413 when a body exceeds ``max_body`` bytes (counted as it arrives, never
buffered past the limit); 501 for cold start on the teacher ensemble; 500 ``{"detail": "internal
error"}``, logged with its traceback, for anything else. IDs are only ever looked up in in-memory
vocabularies: no request names a file.

Single-user answers are computed on the event loop (the student: about 0.1 ms, one (n_items,) score
vector and a partial sort; the teacher ensemble: a few ms, every member's full ranking); batches run in
the thread pool. The teacher in the thread pool instead was no faster here (one measurement on 2 busy
cores, 6,000 requests: 439 vs 437 requests/s on the loop) and cost 40% more CPU (13.6 vs 9.6 s). The
hot path, a valid
``GET /recommend/{user}`` (``k`` absent or plain digits in range, a known user), is answered by
:class:`FastRecommend` before FastAPI's routing and validation; every other request, invalid ones
included, goes to the FastAPI route, whose answers (422, 404) are the documented ones.
"""

import json
import math
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

from ccdrec.errors import CcdrecError
from ccdrec.pipeline.rundir import RunDir
from ccdrec.service.page import Page
from ccdrec.service.swap import ModelSlot, RunWatcher, log
from ccdrec.service.version import load_version

MAX_K = 1000
MAX_BATCH = 1000
MAX_ITEMS = 1000
MAX_BODY = 1 << 20
MAX_BATCH_ITEMS = 100_000  # users x k of one batch answer (about 5 MB of JSON)
SHOWN_ID = 64  # characters of an unknown ID echoed in an error


def import_serve_extra():
    """(fastapi, orjson) or a one-line error naming the extra to install."""
    try:
        import fastapi
        import orjson
    except ImportError as e:
        raise CcdrecError(
            f"the HTTP service needs the serve extra ({e.name} is not installed): pip install 'ccdrec[serve]'"
        ) from None
    return fastapi, orjson


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_body`` bytes, declared or counted as it arrives."""

    def __init__(self, app, max_body: int = MAX_BODY):
        from fastapi import HTTPException

        self.app, self.max_body, self._error = app, int(max_body), HTTPException

    def _message(self) -> str:
        return f"request body larger than {self.max_body:,} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            import orjson

            body = orjson.dumps({"detail": self._message()})
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise self._error(status_code=413, detail=self._message())
            return message

        await self.app(scope, counted, send)


_PLAIN_K = re.compile(rb"k=([1-9][0-9]{0,6})")
PREFIX = "/recommend/"


class FastRecommend:
    """ASGI middleware: answers a valid ``GET /recommend/{user}?k=K`` of a known user directly.

    Valid: the query string is empty or exactly ``k=`` plain digits within 1..``max_k`` and the user is
    in the serving version's universe. The user is everything after ``/recommend/`` in the decoded
    path (``scope["path"]``: ``%2F`` is a ``/`` of the ID, ``%2E`` a ``.``, nothing is trimmed), as the
    route's ``{user:path}`` reads it. Anything else goes on to the application unchanged. The answer is
    the one the FastAPI route gives (``answer``, a coroutine function), from one version read once.
    """

    def __init__(self, app, slot: ModelSlot, max_k: int, answer):
        self.app, self.slot, self.max_k, self.answer = app, slot, int(max_k), answer

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path.startswith(PREFIX) and len(path) > len(PREFIX):
                qs = scope["query_string"]
                k = 20 if not qs else (int(m.group(1)) if (m := _PLAIN_K.fullmatch(qs)) else 0)
                if 1 <= k <= self.max_k:
                    v = self.slot.current  # one version for the whole answer
                    user = path[len(PREFIX) :]
                    uid = v.user_index(user)
                    if uid is not None:
                        body = await self.answer(v, user, uid, k)
                        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                        await send({"type": "http.response.body", "body": body})
                        return
        await self.app(scope, receive, send)


def json_safe(value):
    """``value`` (JSON-like) with every non-finite float as the string JSON cannot carry it as
    (``"NaN"``, ``"Infinity"``, ``"-Infinity"``): what a request body may hold (Python's JSON reader
    accepts those tokens, and ``1e400`` is infinity) and a validation error echoes back."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


MAX_ECHO = 200  # characters of JSON of a refused input a 422 answer repeats
MAX_ERRORS = 20  # validation errors a 422 answer lists; past them, a count


def _short(value, limit: int):
    """``value`` as it is when its JSON has at most ``limit`` characters, else named by its kind and size."""
    if len(json.dumps(value)) <= limit:
        return value
    size = (
        f" of {len(value):,} {'entries' if isinstance(value, list | dict) else 'characters'}" if hasattr(value, "__len__") else ""
    )
    return f"(a {type(value).__name__}{size}, not repeated)"


def _short_input(error):
    """``error`` with a long ``input`` (over :data:`MAX_ECHO` characters of JSON) or a long key in its ``loc``
    (a body's own key, over 64) named instead of repeated."""
    if not isinstance(error, dict):
        return error
    out = dict(error)
    if "input" in out:
        out["input"] = _short(out["input"], MAX_ECHO)
    if isinstance(out.get("loc"), list):
        out["loc"] = [_short(x, 64) if isinstance(x, str) else x for x in out["loc"]]
    return out


def validation_errors(errors) -> list:
    """FastAPI's list of validation errors as JSON-safe data (non-finite inputs as strings), long inputs and
    keys named instead of repeated (:func:`_short_input`: a refused body of 60,000 items would otherwise come
    back whole), at most :data:`MAX_ERRORS` of them and then one entry counting the rest."""
    from fastapi.encoders import jsonable_encoder

    try:
        listed = [_short_input(e) for e in json_safe(jsonable_encoder(errors))]
    except Exception:  # an input or context JSON cannot carry: keep where and what
        listed = [
            _short_input(
                {"type": str(e.get("type", "")), "loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            )
            for e in errors
        ]
    if len(listed) > MAX_ERRORS:
        more = len(listed) - MAX_ERRORS
        listed = [*listed[:MAX_ERRORS], {"type": "more_errors", "loc": [], "msg": f"and {more:,} more error(s), not listed"}]
    return listed


def create_app(
    run_dir: str | Path,
    role: str = "student",
    *,
    poll_seconds: float = 0.5,
    watch: bool = True,
    max_k: int = MAX_K,
    max_batch: int = MAX_BATCH,
    max_items: int = MAX_ITEMS,
    max_body: int = MAX_BODY,
    max_batch_items: int = MAX_BATCH_ITEMS,
):
    """The application serving ``role`` ("student" or "teacher") of ``run_dir`` (module docstring).

    The first version is loaded here: a missing run directory, a run without a student, a changed
    stream or a corrupt checkpoint raise :class:`CcdrecError` before anything listens. With ``watch``,
    the run directory is polled every ``poll_seconds`` while the application runs (lifespan) and newer
    versions are swapped in (:mod:`ccdrec.service.swap`); ``app.state.slot`` and ``app.state.watcher``
    give access to both.
    """
    fastapi, orjson = import_serve_extra()
    from fastapi import Query
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    rd = RunDir.open(Path(run_dir))
    cfg = rd.load_config()
    stream = rd.open_stream(cfg)
    n_members, exact_top = len(cfg.teacher.members), cfg.teacher.ensemble_exact_top
    slot = ModelSlot(load_version(rd, stream, rd.read_state(), role, exact_top, n_members))
    watcher = RunWatcher(slot, rd, stream, role, poll_seconds, n_members, exact_top)
    page = Page(rd, max_k)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        if watch:
            watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = fastapi.FastAPI(
        title="ccdrec",
        summary=f"Recommendations of the {role} of run {rd.path.name}, hot-swapped as the run completes newer ones.",
        lifespan=lifespan,
    )
    app.state.slot, app.state.watcher = slot, watcher
    app.add_middleware(BodyLimit, max_body=max_body)

    class Recommendation(BaseModel):
        item: str = Field(description="original item ID")
        score: float = Field(description="the model's score (higher is better)")

    class UserRecommendations(BaseModel):
        user: str
        k: int
        model: str = Field(description="the model version that computed the answer: CHECKPOINT@SHA256[:12]")
        items: list[Recommendation] = Field(description="best first; seen items excluded; fewer than k when fewer are unseen")

    class Unknown(BaseModel):
        detail: str
        users: int | None = Field(None, description="size of the served user universe")
        items: int | None = Field(None, description="size of the served item universe")
        unknown: list[str] | None = Field(None, description="unknown item IDs (the first 10)")
        first_block: int | None = Field(
            None, description="an unknown user of a block the served model has not reached yet: the block it first appears in"
        )
        block: int | None = Field(None, description="with first_block: the block the served model has reached")

    class Message(BaseModel):
        detail: str

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)  # no true for k=1, no "5" for 5
        users: list[str | int] = Field(min_length=1, max_length=max_batch, description=f"original user IDs (1 to {max_batch})")
        k: int = Field(20, ge=1, le=max_k, description=f"items per user; users x k at most {max_batch_items:,}")

        @model_validator(mode="after")
        def bounded_answer(self):
            if len(self.users) * self.k > max_batch_items:
                raise ValueError(
                    f"{len(self.users):,} users x k={self.k:,} asks for more than {max_batch_items:,} items in one answer"
                )
            return self

    class BatchResult(BaseModel):
        user: str
        items: list[Recommendation]

    class BatchRecommendations(BaseModel):
        k: int
        model: str
        results: list[BatchResult] = Field(description="in the order of the request")

    class ItemsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)  # no true for k=1, no "5" for 5
        items: list[str | int] = Field(
            min_length=1,
            max_length=max_items,
            description=f"original IDs of the items the user just interacted with (1 to {max_items})",
        )
        k: int = Field(20, ge=1, le=max_k)

    class ItemsRecommendations(BaseModel):
        k: int
        model: str
        items: list[Recommendation] = Field(description="best first; the given items excluded")
        unknown: list[str] = Field(description="given item IDs not in the served universe (left out of the user's row)")

    class Health(BaseModel):
        status: str
        model: str

    def json(content, status: int = 200) -> Response:
        return Response(orjson.dumps(content), status_code=status, media_type="application/json")

    def shown(key: str) -> str:
        return key if len(key) <= SHOWN_ID else key[:SHOWN_ID] + "..."

    def unknown_users(v, users: list[str]) -> Response:
        """404 for unknown users; of a user of a block the served model has not reached yet (the example
        shown), the block it first appears in, as ``ccdrec recommend`` says (:meth:`ServedRun.later_hint`)."""
        what = (
            f"unknown user {shown(users[0])!r}" if len(users) == 1 else f"{len(users):,} unknown users, e.g. {shown(users[0])!r}"
        )
        body = {"detail": f"{what}: not in the served {v.role}'s universe ({v.n_users:,} users)", "users": v.n_users}
        first = v.run.first_block(users[0])
        if first is not None:
            body.update(detail=body["detail"] + v.run.later_hint(users[0]), first_block=first, block=v.run.block)
        return json(body, 404)

    k_query = Query(20, ge=1, le=max_k, description=f"number of items, 1 to {max_k}")
    not_found = {404: {"model": Unknown, "description": "unknown user"}}

    async def user_answer(v, user: str, uid: int, k: int) -> bytes:
        return orjson.dumps({"user": user, "k": k, "model": v.id, "items": v.recommend(uid, k)})

    app.add_middleware(FastRecommend, slot=slot, max_k=max_k, answer=user_answer)

    @app.get(
        "/recommend/{user:path}",  # an ID may hold "/" (sent as %2F); "." and ".." are sent as %2E, %2E%2E
        response_model=None,
        responses={200: {"model": UserRecommendations}, **not_found},
        summary="Top-k unseen items for one user",
    )
    async def recommend_user(user: str, k: int = k_query) -> Response:
        v = slot.current  # one version for the whole answer
        uid = v.user_index(user)
        if uid is None:
            return unknown_users(v, [user])
        return Response(await user_answer(v, user, uid, k), media_type="application/json")

    @app.post(
        "/recommend",
        response_model=None,
        responses={200: {"model": BatchRecommendations}, **not_found},
        summary="Top-k unseen items for a batch of users",
    )
    async def recommend_batch(request: BatchRequest) -> Response:
        v = slot.current
        users = [str(u) for u in request.users]
        uids = [v.user_index(u) for u in users]
        missing = [u for u, i in zip(users, uids, strict=True) if i is None]
        if missing:
            return unknown_users(v, missing)
        k = request.k
        lists = await run_in_threadpool(lambda: [v.recommend(uid, k) for uid in uids])
        return json({"k": k, "model": v.id, "results": [{"user": u, "items": x} for u, x in zip(users, lists, strict=True)]})

    @app.post(
        "/recommend/items",
        response_model=None,
        responses={
            200: {"model": ItemsRecommendations},
            404: {"model": Unknown, "description": "none of the items is known"},
            501: {"model": Message, "description": "no cold-start path (teacher ensemble)"},
        },
        summary="Top-k items for a user known only by the items they just interacted with (cold start)",
    )
    async def recommend_items(request: ItemsRequest) -> Response:
        v = slot.current
        if not v.has_cold_start:
            return json({"detail": f"the served {v.role} has no cold-start path; serve the student"}, 501)
        names = [str(i) for i in request.items]
        missing = [n for n in names if v.run.item_index(n) is None]  # as written, else without surrounding spaces
        if len(missing) == len(names):
            return json(
                {
                    "detail": f"{len(missing):,} unknown item(s), e.g. {shown(missing[0])!r}: not in the served {v.role}'s "
                    f"universe ({v.n_items:,} items)",
                    "unknown": [shown(m) for m in missing[:10]],
                    "items": v.n_items,
                },
                404,
            )
        got = await run_in_threadpool(v.run.recommend_for_items, names, request.k)  # a copy of the model is grown
        items = [{"item": r.item, "score": r.score} for r in got.items]
        return json({"k": request.k, "model": v.id, "items": items, "unknown": got.unknown})

    @app.get("/health", response_model=Health, summary="Liveness, and the serving model version")
    async def health() -> Response:
        return json({"status": "ok", "model": slot.current.id})

    def model_info() -> dict:
        v = slot.current
        return {
            **v.describe(),
            "swaps": slot.swaps,
            "history": list(slot.history),
            "refused": list(slot.refused),
            "poll_seconds": watcher.interval if watch else None,
            "uptime_s": round(time.time() - started, 1),
        }

    @app.get("/model", response_model=None, summary="The serving model version, its swaps and refusals")
    async def model() -> Response:
        return json(model_info())

    @app.get("/", response_class=HTMLResponse, summary="The run's summary and a recommendation form (HTML)")
    async def index() -> HTMLResponse:
        body = await run_in_threadpool(page.render, model_info())
        return HTMLResponse(body)

    async def internal_error(request, exc):
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    async def invalid_request(request, exc):
        # FastAPI's own 422 fails to render (500) when an input is NaN or infinite: render it JSON-safe
        return JSONResponse({"detail": validation_errors(exc.errors())}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)
    return app
