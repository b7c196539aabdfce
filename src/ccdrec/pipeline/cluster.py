"""The Ray executor: a block's independent stages (its teacher members) as Ray tasks on a cluster.

A staged run chooses its executor with the configuration fields ``executor`` (``local``, the default,
or ``ray``) and ``ray_address``, or for one invocation with ``ccdrec run / compare --executor ray
--ray-address ADDR`` (:func:`use_executor`: how a run is executed, not what it computes, so a run may
be resumed with the other executor). With ``ray``, :class:`ccdrec.pipeline.staged.StagedRun` hands
every group of independent stages to :func:`run_stage_group`: one Ray task per stage, with the CPUs
(the threads a stage trains with) and the GPU (when the run's device is CUDA) it needs declared, and
records each stage in ``state.json`` as its task returns. The other stages run in the driver.

A task rebuilds the run from its directory, exactly as a local worker process does, so the run
directory (and a ``--data`` stream) must be at the same path on every node: shared storage such as
NFS. A task first checks that it sees the driver's directory (:func:`_stage_task`) and the driver's
versions of ccdrec and torch. A task whose worker or node died is retried once (a stage only writes its
own checkpoints, atomically); a stage that still does not complete ends the run with
:class:`~ccdrec.errors.StageLost` naming it after the other tasks of its group are recorded, and the
run resumes with ``--resume``. An exception raised by a stage's own code is re-raised as it is.

Ray is an optional extra (``pip install 'ccdrec[ray]'``), imported only when ``ray`` is chosen.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from ccdrec.errors import CcdrecError, StageLost

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: pip install 'ccdrec[ray]'"
STAGE_RETRIES = 1  # a task whose worker process or node died runs once more before its stage is lost
START_HINT = (
    "start its head with `ray start --head --port 6379` and give --ray-address HOST:6379, "
    "or leave --ray-address out for a local Ray"
)
VISIBLE_WAIT_S = 30.0  # how long a task waits for the driver's last state.json to show (shared storage lag)

_CHOSEN: ContextVar[tuple[str | None, str | None]] = ContextVar("ccdrec_executor", default=(None, None))
_TASK_THREADS: ContextVar[int | None] = ContextVar("ccdrec_task_threads", default=None)


@contextmanager
def use_task_threads(threads: int | None) -> Iterator[None]:
    """Ray tasks started inside the block declare ``threads`` CPUs (the command's ``--threads``, which may
    exceed the cores of the driver's machine: the cluster's nodes can be bigger); None: this process's
    torch threads (:func:`task_threads`)."""
    token = _TASK_THREADS.set(threads)
    try:
        yield
    finally:
        _TASK_THREADS.reset(token)


def task_threads() -> int:
    """CPU threads of a Ray task's run or stage group: :func:`use_task_threads`'s, else ``torch.get_num_threads()``."""
    import torch

    return _TASK_THREADS.get() or torch.get_num_threads()


@contextmanager
def use_executor(executor: str | None = None, ray_address: str | None = None) -> Iterator[None]:
    """Staged runs started inside the block use ``executor`` / ``ray_address`` instead of their
    configuration's (None: the configuration's). Raises CcdrecError for an unknown executor, or an
    address without ``ray``."""
    if executor is not None and executor not in EXECUTORS:
        raise CcdrecError(f"unknown executor {executor!r}; expected {' or '.join(EXECUTORS)}")
    if ray_address is not None and executor != "ray":
        raise CcdrecError("--ray-address names the cluster of --executor ray: give --executor ray with it")
    token = _CHOSEN.set((executor, ray_address))
    try:
        yield
    finally:
        _CHOSEN.reset(token)


def chosen_executor(executor: str, ray_address: str | None) -> tuple[str, str | None]:
    """(executor, Ray address) of a run configured with ``executor`` / ``ray_address``, after any
    :func:`use_executor` override (its address, else the configuration's; None: RAY_ADDRESS or a local Ray)."""
    over, address = _CHOSEN.get()
    if over is None:
        return executor, ray_address
    return over, (address or ray_address) if over == "ray" else None


def import_ray():
    """The ``ray`` module; CcdrecError (one line, with the install command) when it is not installed."""
    try:
        import ray
    except ImportError:
        raise CcdrecError(RAY_MISSING) from None
    return ray


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``HOST:PORT`` of its head or ``auto``; None: RAY_ADDRESS,
    else start a local Ray instance), unless this process is already connected.

    Ray's SIGTERM handler is undone: SIGTERM keeps stopping a run as Ctrl-C does (completed stages
    kept, the resume command printed). Raises CcdrecError when Ray is missing or the cluster cannot be
    reached."""
    ray = import_ray()
    if ray.is_initialized():
        return
    head = (os.environ.get("RAY_ADDRESS") or address) if address in (None, "auto") else address  # as ray.init reads it
    if head not in (None, "", "auto", "local"):
        check_reachable(head)
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.replace("`--address` flag", "--ray-address").replace("--address flag", "--ray-address")
        raise CcdrecError(f"cannot start or reach the Ray cluster ({where}): {first}; {START_HINT}") from None
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


def check_reachable(head: str) -> None:
    """Raise CcdrecError unless ``HOST:PORT`` accepts a connection within 10 s (``ray.init`` waits minutes
    for a head that is not there). Other forms (``ray://...``) are left to Ray."""
    host, _, port = head.rpartition(":")
    if not host or not port.isdigit() or "://" in head:
        return
    if not 0 < int(port) < 65536:
        raise CcdrecError(f"--ray-address {head}: {port} is not a port (1-65535)")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except OSError as e:
        raise CcdrecError(f"cannot reach the Ray cluster at {head}: {e.strerror or type(e).__name__}; {START_HINT}") from None


def check_resources(
    cpus: int, gpus: int, task: str = "a teacher-member task", remedy: str = "give fewer --threads or more --workers"
) -> None:
    """Raise CcdrecError unless some live node of the cluster has ``cpus`` CPUs and ``gpus`` GPUs (a task
    that fits no node would wait for one forever); the message names the ``task`` and the ``remedy``."""
    ray = import_ray()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    most_cpus = max((int(r.get("CPU", 0)) for r in nodes), default=0)
    most_gpus = max((int(r.get("GPU", 0)) for r in nodes), default=0)
    need = f"{cpus} CPUs" + (f" and {gpus} GPU" if gpus else "")
    have = f"{most_cpus} CPUs" + (f", {most_gpus} GPUs" if gpus else "")
    raise CcdrecError(
        f"{task} needs {need} (--threads / --workers; the run's device) but no node of the Ray cluster "
        f"has them (the largest: {have}): {remedy}"
    )


def precheck(executor: str, ray_address: str | None, cpus: int, gpus: int, task: str, remedy: str) -> None:
    """Before anything is created: with the ``ray`` executor (after :func:`use_executor`), join the
    cluster and check that a node can run a task of ``cpus`` CPUs and ``gpus`` GPUs
    (:func:`check_resources`); nothing with ``local``. Raises CcdrecError."""
    executor, address = chosen_executor(executor, ray_address)
    if executor == "ray":
        connect(address)
        check_resources(cpus, gpus, task, remedy)


def versions() -> dict[str, str]:
    """The versions that must agree between the driver and a task for bit-identical results."""
    from importlib.metadata import version

    import torch

    return {"ccdrec": version("ccdrec"), "torch": torch.__version__}


def _stage_task(run: Callable[[str], Any], name: str, run_dir: str, last_done: str | None, expected: dict[str, str]) -> Any:
    """A Ray task: check that this node runs the driver's versions and sees the driver's run directory,
    then ``run(name)`` (rebuild the run from its directory, run the stage; its checkpoints go there).

    Raises CcdrecError when the node differs from the driver (versions, a run directory not on shared
    storage)."""
    import json

    here = versions()
    if here != expected:
        got = ", ".join(f"{k} {v}" for k, v in here.items())
        want = ", ".join(f"{k} {v}" for k, v in expected.items())
        raise CcdrecError(f"node {socket.gethostname()} runs {got}, the driver {want}: install the same versions on every node")
    state = Path(run_dir) / "state.json"
    deadline = time.monotonic() + VISIBLE_WAIT_S
    while True:
        with suppress(OSError, ValueError):
            completed = json.loads(state.read_text()).get("completed", [])
            if last_done is None or last_done in completed:
                break
        if time.monotonic() > deadline:
            raise CcdrecError(
                f"node {socket.gethostname()} does not see the run directory {run_dir} as the driver wrote it: "
                "put it on storage every node reaches at the same path (NFS or the like)"
            )
        time.sleep(0.5)
    return run(name)


def _failure(e: BaseException) -> str:
    """Why a stage's task did not complete, in a few words."""
    ray = import_ray()
    exc = ray.exceptions
    if isinstance(e, exc.RayTaskError) and isinstance(e.cause, CcdrecError):
        return f"failed: {e.cause}"  # the task's own check: it names the node
    if isinstance(e, exc.OutOfMemoryError):
        return "lost: its node ran out of memory"
    if isinstance(e, exc.WorkerCrashedError):
        return "lost: its Ray worker process died (killed or out of memory)"
    if isinstance(e, exc.NodeDiedError | exc.LocalRayletDiedError):
        return "lost: its node left the Ray cluster"
    if isinstance(e, exc.TaskCancelledError):
        return "lost: its Ray task was cancelled"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"lost: {type(e).__name__}" + (f" ({first})" if first else "")


def _stage_failure(e: BaseException) -> str | None:
    """Why a stage's task did not complete (:func:`_failure`); None for an exception of the stage's own code."""
    return None if _is_stage_bug(e) else _failure(e)


def _is_stage_bug(e: BaseException) -> bool:
    """Whether a task failed by an exception of the stage's own code (a bug: re-raised with its traceback)."""
    ray = import_ray()
    return isinstance(e, ray.exceptions.RayTaskError) and not isinstance(e.cause, CcdrecError | ray.exceptions.RayError)


def run_stage_group(
    names: list[str],
    run: Callable[[str], Any],
    complete: Callable[[str, Any], None],
    run_dir: Path,
    last_done: str | None,
    cpus: int,
    gpus: int,
) -> None:
    """Run the stages ``names`` as Ray tasks (each ``run(name)``, declaring ``cpus`` CPUs and ``gpus``
    GPUs) and ``complete(name, result)`` each in the driver as its task returns.

    ``run`` must be picklable by reference (a module-level function of ccdrec, or a partial of one);
    ``run_dir`` is the run's directory as every node sees it; ``last_done`` the driver's last
    completed stage (a task checks that it sees it). Raises StageLost naming the stages that did not
    complete, once the others are recorded; re-raises a stage's own exception (the other tasks
    cancelled); on an interruption the tasks are cancelled and the interruption re-raised."""
    ray = import_ray()
    task = ray.remote(_stage_task)
    expected = versions()
    path = str(Path(run_dir).resolve())
    pending = {
        task.options(name=f"ccdrec {n}", num_cpus=cpus, num_gpus=gpus, max_retries=STAGE_RETRIES).remote(
            run, n, path, last_done, expected
        ): n
        for n in names
    }
    lost = await_tasks(pending, complete, _stage_failure, lambda n: f"in stage {n}, a Ray task")
    if lost:
        what = "; ".join(f"stage {n} {why}" for n, why in lost)
        raise StageLost(f"{what}; the completed stages are kept")


def await_tasks(
    pending: dict[Any, str],
    done: Callable[[str, Any], None],
    failure: Callable[[BaseException], str | None],
    note: Callable[[str], str],
) -> list[tuple[str, str]]:
    """Wait for the Ray tasks ``pending`` (object ref -> label) and call ``done(label, result)`` as each
    returns; returns (label, why) of the tasks that failed, ``why`` from ``failure(error)``.

    ``failure`` returning None marks an exception of the task's own code (a bug): it is re-raised at
    once with ``note(label)`` added and the other tasks cancelled; an interruption cancels them too."""
    ray = import_ray()
    lost: list[tuple[str, str]] = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                label = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:
                    why = failure(e)
                    if why is None:
                        e.add_note(note(label))
                        raise
                    lost.append((label, why))
                    continue
                done(label, result)
    except BaseException:
        for ref in pending:  # interrupted, or a task failed: stop the other tasks now
            with suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    return lost
