#!/usr/bin/env bash
# GPU check (issue 17): the block-0 teacher benchmark and the Yelp default stream on CUDA, printing the
# same figures as on the CPU plus the GPU's memory peak, within 10 minutes. Installs nothing slow: it
# runs from the source tree (PYTHONPATH=src) with the machine's own torch.
#
#   bash benchmarks/gpu_check.sh [STREAM_SECONDS]
#
# The stream run stops after STREAM_SECONDS (default 420); the stages it completed are printed either way.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
limit="${1:-420}"
python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
PY
echo "== teacher benchmark (LightGCN-128, Yelp D_0) and Gowalla evaluation on CUDA"
timeout 240 python3 benchmarks/teacher_block0.py --device cuda
echo "== Yelp default stream on CUDA (limit ${limit} s)"
run="$(mktemp -d)/run"
timeout "$limit" python3 benchmarks/stream.py --dataset yelp --set device=cuda --no-baseline --out "$run"
code=$?
echo "stream_exit: $code"
python3 - "$run" "stream_exit: $code" <<'PY'
import json, sys
from pathlib import Path
state = Path(sys.argv[1]) / "state.json"
if state.exists():
    s = json.loads(state.read_text())
    print(f"stages_completed: {len(s['completed'])}")
    if len(s["completed"]) and "stream_exit: 0" not in sys.argv[2:]:
        for name, sec in s["seconds"].items():
            print(f"stage_seconds[{name}]: {sec:.1f}")
    print(f"stages_seconds_sum: {sum(s['seconds'].values()):.1f}")
PY
