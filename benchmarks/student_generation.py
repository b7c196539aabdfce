"""Validation sweep of the student-generation switches (issue 18), over the seeds of a sweep directory.

For every seed cell of ``ccdrec compare --seeds ... --cadences M`` (its CCD run trains block 0), runs CCD
again with each variant's ``--set`` overrides, sharing that cell's block 0 (variants that change D_0, such
as ``student.distill_cover``, train their own D_0 from the shared teacher members), into
``CELL/variant-NAME/``; then prints, per variant and role (served student, distilled D_k, teacher
E_k), the stream LA / RA / H-mean on the validation splits (on which a setting is chosen) and on the test
splits (reported, never chosen on), as mean ± sd over the seeds, and D_k's RA as a fraction of E_k's.

    python benchmarks/student_generation.py SWEEP_DIR \
        --variant served=student.distill_from=served \
        --variant retention=student.distill_select=retention \
        --variant both=student.distill_from=served,student.distill_select=retention

Prints one line per variant, role and split; a variant's runs resume after an interruption.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="a directory of `ccdrec compare --seeds ...`")
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value[,key=value...] (repeatable)")
    ap.add_argument("--every", type=int, default=1, help="the cadence cells to use (teacher.update_every)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds to run (default: the sweep's); all are reported")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report-only", action="store_true", help="print the figures of the runs there, train nothing")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from ccdrec.checkpoint import read_json
    from ccdrec.config import RunConfig
    from ccdrec.data.stream import load_stream
    from ccdrec.option_values import comma_list
    from ccdrec.pipeline.ccd import run_stream
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.pipeline.staged import base_signature, share_block0, share_stages
    from ccdrec.pipeline.sweep import SWEEP_FILE, cell_name, parse_ints
    from ccdrec.presets import apply_override
    from ccdrec.report import compare as rc
    from ccdrec.report import sweep as rs

    plan = read_json(args.sweep / SWEEP_FILE)
    variants: dict[str, list[str]] = {"default": []}
    for v in args.variant:
        name, _, sets = v.partition("=")
        variants[name] = comma_list(sets, f"--variant {name}")
    cells = {s: args.sweep / cell_name(s, args.every) for s in plan["seeds"]}
    chosen = set(plan["seeds"]) if args.seeds is None else set(parse_ints(args.seeds, "--seeds", 0))
    rows_by_variant: dict[str, dict[int, list[dict]]] = {n: {} for n in variants}
    for seed, cell in cells.items():
        base = RunDir(cell / "ccd")
        cfg = base.load_config()
        for name, sets in variants.items():
            if not sets:
                rd = base
            else:
                rd = RunDir(cell / f"variant-{name}")
                if not args.report_only and seed in chosen:
                    if not rd.state_path.exists():
                        data = cfg.model_dump(mode="json")
                        for item in sets:
                            data = apply_override(data, item)
                        vcfg = RunConfig.model_validate(data)
                        rd.create(vcfg, load_stream(cfg.dataset))
                        n = len(cfg.teacher.members)
                        if base_signature(vcfg) == base_signature(cfg):
                            share_block0(base, rd, n)
                        else:  # the variant distils another D_0: share the teacher members only
                            members = [f"b0/teacher{m}" for m in range(n)]
                            share_stages(base, rd, members, {f"teacher{m}": f"b0_teacher{m}" for m in range(n)})
                    print(f"== seed {seed}: {name} ({rd.path})", flush=True)
                    run_stream(None, rd.path, resume=True, progress=False)
            if rd.metrics_path.exists():
                rows_by_variant[name][seed] = rc.label_rows(rd.read_metrics(), "ccd", rc.CCD_ROLES)
    metric = "recall@20"
    for name, by_seed in rows_by_variant.items():
        for split in ("valid", "test"):
            t = rs.seed_table(by_seed, ["ccd"], metric, split)
            for (_, role), r in t.iterrows():
                print(f"{name} {split} {role}: LA {r['LA']}  RA {r['RA']}  H {r['H']}  (seeds {r['seeds']})")
        for label in rc.CCD_ROLES.values():  # paired with the default, seed by seed (validation)
            per_seed = {seed: h for seed, rows in by_seed.items() if (h := _stream_h(rows, "ccd", label, metric))}
            base = {seed: _stream_h(rows_by_variant["default"].get(seed, []), "ccd", label, metric) for seed in per_seed}
            hs = " ".join(f"s{seed} {h:.4f}" for seed, h in sorted(per_seed.items()))
            gains = " ".join(f"s{seed} {h - base[seed]:+.4f}" for seed, h in sorted(per_seed.items()) if base[seed])
            paired = f"  (minus default: {gains})" if name != "default" else ""
            print(f"{name} valid {rc.ROLE_NAMES[label]} H per seed: {hs}{paired}")
    for label in ("student", "teacher"):  # the plain fine-tuning of the same cells, for reference
        hs = []
        for seed, cell in cells.items():
            rd = RunDir(cell / "finetune")
            if rd.metrics_path.exists():
                rows = rc.label_rows(rd.read_metrics(), "finetune", rc.cl_roles("finetune"))
                if (h := _stream_h(rows, "finetune", label, metric)) is not None:
                    hs.append(f"s{seed} {h:.4f}")
        if hs:
            print(f"finetune valid {rc.ROLE_NAMES[label]} H per seed: {' '.join(hs)}")
        for split in ("valid", "test"):
            ret = rs.retention_table(by_seed, "ccd", metric, split)
            if not ret.empty:
                fr = " ".join(f"{v:.2f}" for v in ret["D_k / E_k"])
                print(f"{name} {split} retention D_k RA / E_k RA per block: {fr}")


def _stream_h(rows: list[dict], method: str, role: str, metric: str) -> float | None:
    """The stream H-mean of ``method``'s ``role`` on the validation splits; None without rows."""
    from ccdrec.report.compare import stream_summary

    h = stream_summary(rows, method, role, metric, "valid")["H"] if rows else float("nan")
    return None if h != h else h


if __name__ == "__main__":
    main()
