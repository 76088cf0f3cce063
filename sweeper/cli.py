"""``sweeper`` / ``python -m sweeper``: one verb per subcommand, each mapping to one function.

    python -m sweeper --manifest M.yaml [key=value ...] [--dry-run]     run (the default verb)
    sweeper validate --manifest M.yaml [key=value ...]
    sweeper leaderboard [SWEEP_DIR] [--limit N] [--json] [--all]
    sweeper resume SWEEP_DIR [--retry-errored]
    sweeper cost [SWEEP_DIR] [--json]                  seconds per trial part, ASHA rung, phase, sweep
    sweeper explain TRIAL [SWEEP_DIR] [--json]         one trial's ASHA decisions and cost

User errors print one line and exit non-zero (codes in ``sweeper.errors``); tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .errors import EXIT_BUG, EXIT_OK, SweeperError

VERBS = ("run", "validate", "leaderboard", "resume", "export", "decrypt", "verify", "cost", "explain",
         "monitor", "report")


def _add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", "-m", required=True, help="the sweep manifest (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides, e.g. search.num_samples=4")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sweeper", description="Ray-distributed hyperparameter sweeps from one manifest.")
    sub = ap.add_subparsers(dest="verb")
    run = sub.add_parser("run", help="run (or resume) the sweep a manifest declares")
    _add_manifest_args(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    run.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)")
    run.add_argument("--rerun", action="store_true", help="start a new sweep even if this manifest already ran")
    run.add_argument("--retry-errored", action="store_true", help="when resuming, retry errored trials from their last checkpoint")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    run.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray only)")
    run.add_argument("--from-stage", metavar="NAME", help="chains: skip the stages before NAME (their winners must exist)")
    run.add_argument("--from-checkpoint", metavar="PATH",
                     help="promote this checkpoint (dir or .safetensors) without a sweep: fine-tune/fan-out/export only")
    val = sub.add_parser("validate", help="check a manifest offline; report every problem at once")
    _add_manifest_args(val)
    lb = sub.add_parser("leaderboard", help="rank a sweep's trials")
    lb.add_argument("sweep_dir", nargs="?", help="a sweep directory (default: results/latest)")
    lb.add_argument("--limit", type=int, default=None)
    lb.add_argument("--json", action="store_true", help="machine-readable output")
    lb.add_argument("--all", metavar="ROOT", nargs="?", const="results", help="one line per sweep under ROOT")
    ex = sub.add_parser("export", help="(re-)export a sweep's promoted winner as safetensors, optionally encrypted")
    ex.add_argument("sweep_dir", nargs="?", help="a sweep directory (default: results/latest)")
    ex.add_argument("--encrypt", action="store_true", help="encrypt with the key in --key-env")
    ex.add_argument("--key-env", metavar="VAR", help="environment variable holding the Fernet key(s), comma-separated for rotation")
    ex.add_argument("--out", help="export directory (default: SWEEP_DIR/export)")
    de = sub.add_parser("decrypt", help="decrypt an exported .enc file (streamed; no partial plaintext on failure)")
    de.add_argument("src")
    de.add_argument("dst")
    de.add_argument("--key-env", metavar="VAR", required=True)
    ve = sub.add_parser("verify", help="verify an export directory, an .enc file, or a checkpoint directory")
    ve.add_argument("path")
    ve.add_argument("--key-env", metavar="VAR")
    co = sub.add_parser("cost", help="where a sweep's wall and accelerator seconds went (per trial part, rung, phase)")
    co.add_argument("sweep_dir", nargs="?", help="a sweep directory (default: results/latest)")
    co.add_argument("--json", action="store_true", help="machine-readable output")
    xp = sub.add_parser("explain", help="one trial: every ASHA decision, why it stopped, its cost")
    xp.add_argument("trial", help="trial id (or its unique suffix)")
    xp.add_argument("sweep_dir", nargs="?", help="a sweep directory (default: results/latest)")
    xp.add_argument("--json", action="store_true")
    rs = sub.add_parser("resume", help="resume an interrupted sweep from its directory")
    rs.add_argument("sweep_dir")
    rs.add_argument("--retry-errored", action="store_true")
    rs.add_argument("--address")
    rs.add_argument("--quiet", "-q", action="store_true")
    mo = sub.add_parser("monitor", help="the live view of a sweep, read from its directory")
    mo.add_argument("sweep_dir", nargs="?", help="a sweep directory (default: results/latest)")
    mo.add_argument("--follow", "-f", action="store_true", help="re-render until the sweep is no longer running")
    mo.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --follow")
    rp = sub.add_parser("report", help="write one self-contained HTML report of a sweep")
    rp.add_argument("sweep_dir", nargs="?", help="a sweep directory (default: results/latest)")
    rp.add_argument("--out", help="the HTML file to write (default: SWEEP_DIR/report.html)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in VERBS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # `python -m sweeper --manifest M.yaml` is the run verb
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.verb:
        ap.print_help()
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"run": cmd_run, "validate": cmd_validate, "leaderboard": cmd_leaderboard, "resume": cmd_resume,
                "export": cmd_export, "decrypt": cmd_decrypt, "verify": cmd_verify, "cost": cmd_cost,
                "explain": cmd_explain, "monitor": cmd_monitor, "report": cmd_report}[args.verb](args) or 0
    except SweeperError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: the sweep can be resumed by running the same command again", file=sys.stderr)
        return 130


# Everything str.splitlines() breaks on: a key or value quoted from a hostile manifest must not
# turn the one-line error into several (or forge a second "error:" line).
_LINE_BREAKS = {c: c.encode("unicode_escape").decode("ascii") for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(text: str) -> str:
    return text.translate(str.maketrans(_LINE_BREAKS))


def _load(args):
    from . import manifest

    loaded = manifest.load(args.manifest, args.overrides)
    for k, v in loaded.overrides.items():
        print(f"override {k} = {v!r}")
    return loaded


def _is_chain(path: str) -> bool:
    from .chain import is_chain
    from .manifest import read_manifest_file

    data, _ = read_manifest_file(path)
    return is_chain(data)


def cmd_validate(args) -> int:
    if _is_chain(args.manifest):
        from .chain import load_chain

        chain, stages = load_chain(Path(args.manifest), args.overrides)
        print(f"{args.manifest}: ok (chain of {len(stages)} stages: {', '.join(s.name for s, _, _ in stages)})")
        return 0
    loaded = _load(args)
    print(f"{args.manifest}: ok ({loaded.manifest.trainable}, {loaded.manifest.search.num_samples} trials)")
    return 0


def plan(loaded) -> dict:
    m = loaded.manifest
    rungs = []
    if m.scheduler.type == "asha":
        t = m.scheduler.grace_period
        while t < m.scheduler.max_t:
            rungs.append(round(t, 3))
            t *= m.scheduler.reduction_factor
    r = m.resources
    conc = min(m.search.max_concurrent, m.search.num_samples)
    n, budget, alive = m.search.num_samples, 0.0, float(m.search.num_samples)
    prev = 0
    for rung in rungs:  # ideal ASHA: 1/rf of the trials pass each rung
        budget += alive * (rung - prev)
        prev, alive = rung, alive / m.scheduler.reduction_factor
    budget += alive * (m.training.max_epochs - prev)
    return {
        "sweep": f"{m.name}-{loaded.identity()}",
        "trainable": m.trainable,
        "model": m.model.path or m.model.size,
        "trials": n,
        "algorithm": f"{m.search.algorithm} (seed {m.search.seed})",
        "space": {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in m.search.space.items()},
        "scheduler": m.scheduler.type + (f" ({m.scheduler.variant})" if m.scheduler.type == "asha" else ""),
        "rungs": rungs,
        "max_epochs": m.training.max_epochs,
        "concurrency": conc,
        "per_trial": {"cpus": r.cpus, "gpus": r.gpus, "workers": r.workers},
        "peak": {"cpus": conc * r.cpus * r.workers,
                 "gpus": f"{conc} x auto" if r.gpus == "auto" else conc * r.gpus * r.workers},
        **({"gpus_auto": _packing_plan(loaded)} if r.gpus == "auto" else {}),
        "budget_epochs_max": n * m.training.max_epochs,
        "budget_epochs_asha_ideal": round(budget, 1),
        "results_root": m.output.root,
    }


def _packing_plan(loaded) -> dict:
    from .packing import plan_entry

    return plan_entry(loaded.resolved())


def cmd_run(args) -> int:
    kw = dict(address=args.address, rerun=args.rerun, retry_errored=args.retry_errored, quiet=args.quiet,
              dashboard=not args.no_dashboard)
    if _is_chain(args.manifest):
        from .chain import run_chain

        if args.dry_run:
            from .chain import load_chain

            _, stages = load_chain(Path(args.manifest), args.overrides)
            for st, p, ov in stages:
                from . import manifest

                print(f"stage {st.name}: " + json.dumps(plan(manifest.load(p, ov)), indent=2))
            return 0
        if args.from_checkpoint:
            from .errors import UserError

            raise UserError("--from-checkpoint applies to a single manifest, not a chain (use --from-stage)")
        done = run_chain(Path(args.manifest), args.overrides, from_stage=args.from_stage, **kw)
        for rec in done:
            print(f"stage {rec['stage']}: {rec['status']}  winner {rec['winner_checkpoint']}  export {rec.get('export')}")
        return 0
    if args.from_stage:
        from .errors import UserError

        raise UserError("--from-stage applies to a chain manifest (one with `stages:`)")
    loaded = _load(args)
    if args.dry_run:
        p = plan(loaded)
        print(json.dumps(p, indent=2))
        return 0
    from . import leaderboard, promote

    sweep_dir, state = promote.run_pipeline(loaded, from_checkpoint=args.from_checkpoint, **kw)
    if (sweep_dir / "sweep" / "trials.parquet").exists():
        lrows, extra = leaderboard.load(sweep_dir)
        leaderboard.render(sweep_dir, lrows, extra, limit=10)
    print(f"results: {sweep_dir}")
    return 0


def cmd_resume(args) -> int:
    from . import leaderboard, manifest, runner

    d = Path(args.sweep_dir)
    src = d / "manifest.resolved.yaml"
    if not src.exists():
        from .errors import UserError

        raise UserError(f"{d}: not a sweep directory (no manifest.resolved.yaml)")
    loaded = manifest.load(src)
    # the resolved manifest hashes to the same identity, so this lands in the same directory
    from . import promote

    sweep_dir, _ = promote.run_pipeline(loaded, address=args.address, retry_errored=args.retry_errored, quiet=args.quiet)
    lrows, extra = leaderboard.load(sweep_dir)
    leaderboard.render(sweep_dir, lrows, extra, limit=10)
    return 0


def cmd_leaderboard(args) -> int:
    from . import leaderboard

    if args.all:
        rows = leaderboard.all_sweeps(Path(args.all))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['sweep']:<40} {r.get('status'):<10} trials {r.get('trials', '-'):>4}  "
                      f"best {r.get('metric')}={r.get('best')} ({r.get('best_trial')})")
        return 0
    d = leaderboard.resolve_sweep_dir(args.sweep_dir)
    rows, extra = leaderboard.load(d)
    if args.json:
        out = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
               for r in leaderboard.table_rows(rows, args.limit)]
        from .cost import totals

        print(json.dumps({"sweep": d.name, "trials": out, "totals": totals(rows), **extra}, indent=2, default=str))
    else:
        leaderboard.render(d, rows, extra, args.limit)
    return 0


def cmd_cost(args) -> int:
    from . import cost, leaderboard

    d = leaderboard.resolve_sweep_dir(args.sweep_dir)
    rep = cost.report(d)
    print(json.dumps(rep, indent=2) if args.json else cost.render(rep))
    return 0


def cmd_explain(args) -> int:
    from . import cost, leaderboard

    d = leaderboard.resolve_sweep_dir(args.sweep_dir)
    e = cost.explain(d, args.trial)
    print(json.dumps(e, indent=2, default=str) if args.json else cost.render_explain(e))
    return 0


def cmd_export(args) -> int:
    from . import leaderboard, manifest, promote
    from .errors import UserError
    from .export import export_checkpoint

    d = leaderboard.resolve_sweep_dir(args.sweep_dir)
    loaded = manifest.load(d / "manifest.resolved.yaml")
    state = promote.read_promotion(d)
    ckpt = (state.get("final") or {}).get("checkpoint")
    if not ckpt:
        best = d / "checkpoints" / "best"
        if not best.exists():
            raise UserError(f"{d}: nothing to export (no promotion record and no checkpoints/best)")
        ckpt = str(best.resolve())
    encrypt = True if args.encrypt else None
    info = export_checkpoint(loaded, d, ckpt, state, encrypt=encrypt, key_env=args.key_env,
                             out=Path(args.out) if args.out else None)
    print(f"exported {info['weights']} (sha256 {info['sha256'][:16]}…, encrypted: {info['encrypted']})")
    return 0


def cmd_decrypt(args) -> int:
    from . import crypto

    info = crypto.decrypt_file(args.src, args.dst, args.key_env)
    print(f"decrypted {args.src} -> {args.dst}: {info['bytes']} bytes in {info['chunks']} chunks, sha256 {info['sha256']}")
    return 0


def cmd_verify(args) -> int:
    p = Path(args.path)
    if p.is_dir() and (p / "CHECKSUMS.json").exists():
        from .checkpoint import verify_checkpoint

        verify_checkpoint(p)
        print(f"{p}: checkpoint verifies")
        return 0
    from .export import verify_export

    info = verify_export(p, args.key_env)
    print(f"{p}: ok " + json.dumps(info, default=str))
    return 0



def cmd_monitor(args) -> int:
    from . import monitor

    return monitor.main_args(args)


def cmd_report(args) -> int:
    from . import report
    from .leaderboard import resolve_sweep_dir

    out = report.write_report(resolve_sweep_dir(args.sweep_dir), Path(args.out) if args.out else None)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
