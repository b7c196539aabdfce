"""Running the service: bind the socket (one-line errors), build the application, run uvicorn.

uvicorn is imported inside :func:`serve`; it uses uvloop and httptools when they are installed (the
``serve`` extra installs them). One process, one event loop: hot swap needs a single serving slot.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
import sys
from pathlib import Path

from ccdrec.errors import CcdrecError
from ccdrec.pipeline.rundir import RunDir
from ccdrec.service.swap import log


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free one), or a one-line :class:`CcdrecError`."""
    if not 0 <= port <= 65535:
        raise CcdrecError(f"--port {port} is out of range (0..65535)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise CcdrecError(f"--host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CcdrecError(f"{host}:{port} is already in use (another process listens there); choose another --port") from None
        raise CcdrecError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


MAX_POLL = 86400.0  # seconds: a day between looks at the run directory


def check_options(port: int, poll_seconds: float, threads: int) -> None:
    """A one-line :class:`CcdrecError` for a numeric option out of range (NaN and infinities included)."""
    if not 0 <= port <= 65535:
        raise CcdrecError(f"--port {port} is out of range (0..65535)")
    if not (math.isfinite(poll_seconds) and 0 < poll_seconds <= MAX_POLL):
        raise CcdrecError(f"--poll must be a number of seconds in (0, {MAX_POLL:g}], got {poll_seconds}")
    most = 4 * (os.cpu_count() or 1)
    if not 1 <= threads <= most:
        raise CcdrecError(f"--threads must be between 1 and {most} (4 x the {os.cpu_count()} cores), got {threads}")


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    role: str = "student",
    poll_seconds: float = 0.5,
    access_log: bool = False,
    threads: int = 1,
) -> None:
    """Serve ``role`` of ``run_dir`` on ``host:port`` until interrupted (see :mod:`ccdrec.service.app`)."""
    check_options(port, poll_seconds, threads)
    from ccdrec.service.app import create_app, import_serve_extra

    import_serve_extra()
    try:
        import uvicorn
    except ImportError:
        raise CcdrecError(
            "the HTTP service needs the serve extra (uvicorn is not installed): pip install 'ccdrec[serve]'"
        ) from None
    import torch

    torch.set_num_threads(threads)  # one answer is a (n_items,) score vector: more threads only spin
    RunDir.open(Path(run_dir))
    sock = listen(host, port)
    try:
        app = create_app(run_dir, role, poll_seconds=poll_seconds)
    except BaseException:
        sock.close()
        raise
    _log_to_stderr()
    v = app.state.slot.current
    bound = sock.getsockname()
    log.info("serving %s %s of %s on http://%s:%d", role, v.id, Path(run_dir), host, bound[1])
    if not is_loopback(host):
        log.warning("listening on %s, not loopback: anyone who reaches this machine can query the run", host)
    config = uvicorn.Config(
        app, log_level="info", access_log=access_log, lifespan="on", server_header=False, timeout_keep_alive=5
    )
    uvicorn.Server(config).run(sockets=[sock])
