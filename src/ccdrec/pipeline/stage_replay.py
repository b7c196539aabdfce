"""Run one stage of a finished CCD run again, through the run's own code, to try a variant of it.

:func:`replay_stage` rebuilds the models the run held just before the stage (from the pointers every
completed stage recorded in ``state.json``), runs the stage as the run's stage list defines it (same
function, same seed) on a scratch copy of the run directory, and returns the state after it. The run
itself is never changed. ``benchmarks/teacher_replay.py`` chooses settings this way, on validation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ccdrec.config import RunConfig
from ccdrec.data.stream import Stream
from ccdrec.errors import CcdrecError
from ccdrec.pipeline.ccd import CCDStream
from ccdrec.pipeline.context import RunState
from ccdrec.pipeline.rundir import STATE_VERSION, RunDir
from ccdrec.pipeline.staged import link_file


def pointers_before(rd: RunDir, stream: Stream, stage: str) -> dict[str, str]:
    """The checkpoint each role pointed to just before ``stage`` ran in the run ``rd`` (on ``stream``)."""
    record = rd.read_state()
    outputs = record.get("outputs")
    if not outputs:
        raise CcdrecError(f"{rd.path}: state.json records no per-stage outputs (written by an earlier ccdrec); rerun it")
    if stage not in record["completed"]:
        raise CcdrecError(f"{rd.path}: stage {stage} has not completed")
    order = [name for name, _ in CCDStream(rd.load_config(), rd, stream, progress=False).stage_list()]
    pointers: dict[str, str] = {}
    for name in order[: order.index(stage)]:
        if name not in outputs:
            raise CcdrecError(f"{rd.path}: stage {name} before {stage} recorded no outputs")
        pointers.update(outputs[name])
    return pointers


def replay_stage(rd: RunDir, stage: str, cfg: RunConfig | None = None) -> tuple[RunState, Stream]:
    """Run ``stage`` (e.g. ``b2/teacher0``) of the CCD run ``rd`` again under ``cfg`` (default: the run's
    own configuration) from the run's models before it; returns (the state after the stage, the stream).

    Teacher-side replay candidates are recomputed from their sources (a variant may change their budget).
    """
    stream = rd.open_stream(rd.load_config())
    pointers = pointers_before(rd, stream, stage)
    pointers.pop("replay_candidates", None)
    with tempfile.TemporaryDirectory(prefix="ccdrec-replay-") as tmp:
        scratch = RunDir(Path(tmp) / "run")
        for f in (rd.path / "checkpoints").iterdir():
            if f.is_file():
                link_file(f, scratch.ckpt(f.name))
        scratch.write_state({"version": STATE_VERSION, "completed": [], "pointers": pointers, "seconds": {}})
        run = CCDStream(cfg or rd.load_config(), scratch, stream, progress=False)
        stages = dict(run.stage_list())
        if stage not in stages:
            raise CcdrecError(f"stage {stage} is not a stage of this configuration")
        run.restore()
        stages[stage]()
        return run.state, stream
