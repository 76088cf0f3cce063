"""Stage chains: V2 -> V3 -> V4, each stage a whole pipeline with its own gates, each later stage
warm-starting its phase-1 trials from the previous stage's promoted winner.

Transfer rule per stage (``transfer: auto``): ``compatible`` when the model family and size match
the previous stage (same network: carry everything that fits), else ``backbone`` (a different
head or size: only the backbone's matching tensors carry over, heads start fresh).

State lives in ``<root>/<chain name>/chain.json``. ``--from-stage NAME`` skips the stages before
NAME, which must have recorded winners; re-running a chain re-runs nothing already complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import manifest as mf
from .errors import ManifestError, UserError
from .fsutil import atomic_write_text
from .paths import ensure_dir, safe_name


def is_chain(data: dict) -> bool:
    return isinstance(data, dict) and "stages" in data


def _identity(m: mf.Manifest) -> tuple:
    return (m.trainable, m.model.path or m.model.size, json.dumps(m.model.config_overrides, sort_keys=True))


def load_chain(path: Path, overrides: list[str]) -> tuple[mf.Chain, list[tuple[mf.StageSpec, Path, list[str]]]]:
    data, _ = mf.read_manifest_file(path)
    chain_ov = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in
                {s.get("name") for s in data.get("stages", []) if isinstance(s, dict)}]
    if chain_ov:
        raise ManifestError("overrides", [f"override `{o.split('=', 1)[0]}`: in a chain, prefix keys with a stage "
                                          f"name (e.g. STAGE.training.max_epochs=3)" for o in chain_ov])
    try:
        chain = mf.Chain.model_validate(data)
    except mf.ValidationError as e:
        raise ManifestError(f"chain {path}", mf._pydantic_problems(e)) from None
    problems, stages = [], []
    try:
        safe_name(chain.name, "`name`")  # the chain's directory: refused before anything is created
    except UserError as e:
        problems.append(str(e))
    names = [s.name for s in chain.stages]
    for i, n in enumerate(names):
        try:
            safe_name(n, f"`stages[{i}].name`")
        except UserError as e:
            problems.append(str(e))
    if len(set(names)) != len(names):
        problems.append("`stages`: stage names must be distinct")
    for i, st in enumerate(chain.stages):
        p = (path.parent / st.manifest).resolve() if not Path(st.manifest).is_absolute() else Path(st.manifest)
        if not p.is_file():
            problems.append(f"`stages[{i}].manifest`: {st.manifest} does not exist")
            continue
        ov = list(st.overrides) + [o.split(".", 1)[1] for o in overrides if o.startswith(st.name + ".")]
        try:
            mf.load(p, ov)  # every stage validated before anything starts
        except (ManifestError, UserError) as e:
            problems.append(f"stage {st.name}: {e}")
        stages.append((st, p, ov))
    if problems:
        raise ManifestError(f"chain {path}", problems)
    return chain, stages


def run_chain(path: Path, overrides: list[str], *, from_stage: str | None = None, **kw) -> list[dict]:
    from .promote import run_pipeline

    chain, stages = load_chain(Path(path), overrides)
    names = [s.name for s, _, _ in stages]
    if from_stage is not None and from_stage not in names:
        raise UserError(f"--from-stage {from_stage!r}: no such stage; stages are {', '.join(names)}")
    root = Path(chain.output.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    cdir = ensure_dir(root.resolve(), safe_name(chain.name, "`name`"))
    state_path = cdir / "chain.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
    start = names.index(from_stage) if from_stage else 0
    # stages skipped by --from-stage must have a recorded, still-present winner
    for st, _, _ in stages[:start]:
        rec = state["stages"].get(st.name)
        if not rec or rec.get("status") != "complete" or not Path(rec.get("winner_checkpoint", "")).exists():
            raise UserError(f"--from-stage {from_stage}: stage {st.name} has no recorded winner in {state_path}; "
                            "run the chain without --from-stage first")
    prev = state["stages"].get(stages[start - 1][0].name) if start else None
    out = []
    for st, p, ov in stages[start:]:
        ov = list(ov)
        if prev:
            this = mf.load(p, ov).manifest
            same = tuple(prev["identity"]) == _identity(this)
            rule = st.transfer if st.transfer != "auto" else ("compatible" if same else "backbone")
            ov += [f"init_from={prev['winner_checkpoint']}", f"init_transfer={rule}"]
        loaded = mf.load(p, ov)
        rec = {"manifest": str(p), "status": "running", "identity": list(_identity(loaded.manifest)),
               "init_from": loaded.manifest.init_from, "transfer": loaded.manifest.init_transfer if prev else None}
        state["stages"][st.name] = rec
        atomic_write_text(state_path, json.dumps(state, indent=2))
        try:
            sweep_dir, pstate = run_pipeline(loaded, **kw)
        except Exception as e:
            rec.update(status="gate_failed" if type(e).__name__ == "GateFailed" else "failed", verdict=str(e))
            atomic_write_text(state_path, json.dumps(state, indent=2))
            raise
        rec.update(status="complete", sweep_dir=str(sweep_dir), winner_checkpoint=pstate["final"]["checkpoint"],
                   metrics=pstate["final"].get("metrics", {}), export=(pstate.get("export") or {}).get("path"))
        atomic_write_text(state_path, json.dumps(state, indent=2))
        out.append({"stage": st.name, **rec})
        prev = rec
    return out
