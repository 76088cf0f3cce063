"""Promotion on a real local Ray: gates, selection, seed-mean fan-out, transfer rules, chains, export."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from sweeper import cli, leaderboard, manifest
from sweeper.errors import EXIT_GATE, EXIT_INTEGRITY, EXIT_USER
from sweeper.promote import read_promotion, select_candidates, summarize_fanout
from sweeper.transfer import apply_transfer, plan_transfer
from tests.conftest import TINY_QWEN
from trainables import registry
from trainables.base import HParams

# ------------------------------------------------------------------------------ pure selection


def _row(tid, rank, best, status="completed", seed=None, cand=None, ckpt="/c"):
    cfg = {"lr": 1e-3}
    if seed is not None:
        cfg = {"_run": {"candidate": cand, "seed": seed, "init_from": "/x", "hp": {"lr": 1e-3}}}
    return {"trial_id": tid, "rank": rank, "best": best, "status": status, "config": json.dumps(cfg),
            "checkpoint": ckpt, "metric": "val_mae"}


def test_lucky_phase1_winner_loses_on_the_seed_mean():
    # phase 1: A beat B (0.50 < 0.52); under seeds 101/555/888 A averages 0.70, B 0.55 -> B is chosen
    a, b = _row("A", 1, 0.50), _row("B", 2, 0.52)
    fan = [_row("f1", 1, 0.51, seed=101, cand="A", ckpt="/fa1"), _row("f2", 2, 0.90, seed=555, cand="A"),
           _row("f3", 3, 0.69, seed=888, cand="A"), _row("f4", 1, 0.56, seed=101, cand="B"),
           _row("f5", 2, 0.53, seed=555, cand="B", ckpt="/fb555"), _row("f6", 3, 0.56, seed=888, cand="B")]
    s = summarize_fanout(fan, [a, b], "val_mae", "min")
    assert s["chosen"] == "B" and s["lucky_winner"] is True
    assert s["chosen_seed"] == "555" and s["chosen_checkpoint"] == "/fb555"  # best seed of the chosen candidate
    by = {c["trial_id"]: c for c in s["candidates"]}
    assert by["A"]["mean"] == pytest.approx(0.70) and by["B"]["mean"] == pytest.approx(0.55)
    assert by["A"]["std"] == pytest.approx(0.19519, rel=1e-3) and by["A"]["phase1_rank"] == 1
    assert by["A"]["per_seed"] == {"101": 0.51, "555": 0.90, "888": 0.69}
    # mode max: the same numbers as accuracies choose A
    assert summarize_fanout(fan, [a, b], "val_acc", "max")["chosen"] == "A"


def test_a_candidate_with_a_failed_seed_cannot_win():
    a, b = _row("A", 1, 0.5), _row("B", 2, 0.6)
    fan = [_row("f1", 1, 0.1, seed=101, cand="A"), _row("f2", None, float("nan"), status="failed", seed=555, cand="A"),
           _row("f3", 2, 0.6, seed=101, cand="B"), _row("f4", 3, 0.6, seed=555, cand="B")]
    s = summarize_fanout(fan, [a, b], "val_mae", "min")
    assert s["chosen"] == "B" and next(c for c in s["candidates"] if c["trial_id"] == "A")["mean"] is None


def test_selection_skips_unranked_and_gate_failing_trials():
    g = manifest.parse_gates({"val_mae": "< 1.0"})
    rows = [_row("err", None, None, status="error"), _row("nan", None, float("nan"), status="failed"),
            _row("t1", 1, 1.2, ckpt=None), _row("t2", 2, 1.1), _row("t3", 3, 0.9), _row("t4", 4, 0.95)]
    cands, verdicts = select_candidates(rows, g, 2)
    assert [c["trial_id"] for c in cands] == ["t3", "t4"]
    assert verdicts and "val_mae = 1.1, threshold < 1" in verdicts[0]


# ------------------------------------------------------------------------------ transfer rules


def _model(dims: int, layers: int, seed: int):
    torch.manual_seed(seed)
    fam = registry.get("qwen_regression")
    m = copy.deepcopy(TINY_QWEN)
    m["model"]["config_overrides"]["num_hidden_layers"] = layers
    m["data"]["generator"]["dimensions"] = dims
    m = manifest.validate_data(m, "test", []).model_dump(mode="json")
    splits = fam.load_splits(m["data"], m["model"])
    return fam.build_model(m["model"], splits, HParams())


def _clone(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def test_compatible_copies_every_matching_tensor_and_reports_the_rest():
    src = _clone(_model(2, 1, seed=1).state_dict())
    tgt_model = _model(3, 1, seed=2)  # a 3-output head: head shapes differ
    before = _clone(tgt_model.state_dict())
    plan = apply_transfer(tgt_model, src, "compatible")
    after = tgt_model.state_dict()
    head = {"head.proj.weight", "head.proj.bias"}
    assert set(plan["copied"]) == set(src) - head
    assert {n for n, _ in plan["skipped"]} == head and all("shape" in why for _, why in plan["skipped"])
    assert set(plan["fresh"]) == head
    for k in plan["copied"]:
        assert torch.equal(after[k], src[k]), k
    for k in head:
        assert torch.equal(after[k], before[k]), k  # untouched: the target's own fresh init


def test_backbone_copies_the_backbone_only_and_heads_start_fresh():
    src = _clone(_model(2, 1, seed=1).state_dict())
    tgt_model = _model(2, 2, seed=2)  # same head shape, one more layer
    before = _clone(tgt_model.state_dict())
    plan = apply_transfer(tgt_model, src, "backbone")
    after = tgt_model.state_dict()
    backbone_src = {k for k in src if k.startswith("backbone.")}
    assert set(plan["copied"]) == backbone_src  # every source backbone tensor exists in the deeper target
    assert {n for n, why in plan["skipped"]} == {"head.proj.weight", "head.proj.bias"}
    assert all(why == "not backbone" for _, why in plan["skipped"])
    layer1 = {k for k in after if k.startswith("backbone.layers.1.")}
    assert layer1 and layer1 <= set(plan["fresh"])
    for k in plan["copied"]:
        assert torch.equal(after[k], src[k]), k
    for k in layer1 | {"head.proj.weight", "head.proj.bias"}:
        assert torch.equal(after[k], before[k]), k
    # the same-shape head of the source was NOT copied, although it would fit
    assert not torch.equal(after["head.proj.weight"], src["head.proj.weight"])


def test_plan_refuses_an_unknown_rule():
    from sweeper.errors import UserError

    with pytest.raises(UserError, match="transfer rule"):
        plan_transfer({}, {}, "everything")


# ------------------------------------------------------------------------------ pipelines on Ray


def _pipeline(tiny_qwen, name, **extra):
    d = copy.deepcopy(tiny_qwen)
    d["name"] = name
    d["search"].update(num_samples=3, max_concurrent=2)
    d["training"].update(max_epochs=2)
    d["scheduler"] = {"type": "none"}
    d["gates"] = {"val_mae": "< 50"}
    d["promotion"] = {"fanout": {"seeds": [101, 555, 888], "candidates": 2, "epochs": 1}}
    d["export"] = {"enabled": True}
    d.update(extra)
    return d


def _run_cli(args, capsys):
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_sweep_gate_fanout_export_and_idempotent_rerun(ray_session, write_manifest, tiny_qwen, capsys):
    p = write_manifest(_pipeline(tiny_qwen, "t-promo"))
    rc, out, err = _run_cli(["--manifest", str(p), "-q"], capsys)
    assert rc == 0, err
    sweep_dir = Path(out.strip().splitlines()[-1].split("results:", 1)[1].strip())
    st = read_promotion(sweep_dir)
    fan = st["fanout"]
    assert fan["complete"] and fan["seeds"] == [101, 555, 888] and len(fan["candidates"]) == 2
    rows = pq.read_table(sweep_dir / "fanout" / "trials.parquet").to_pylist()
    assert len(rows) == 6 and {json.loads(r["config"])["_run"]["seed"] for r in rows} == {101, 555, 888}
    # the choice is the seed mean, recomputed here from the Parquet table alone
    means = {}
    for c in fan["candidates"]:
        vals = [r["best"] for r in rows if json.loads(r["config"])["_run"]["candidate"] == c["trial_id"]]
        means[c["trial_id"]] = sum(vals) / len(vals)
        assert c["mean"] == pytest.approx(means[c["trial_id"]])
    assert fan["chosen"] == min(means, key=means.get)
    # every fan-out run warm-started from its candidate's phase-1 checkpoint (compatible: all tensors)
    for r in rows:
        s = json.loads((Path(r["checkpoint"]) / "state.json").read_text())
        assert s["transfer"]["rule"] == "compatible" and s["transfer"]["skipped"] == [] and s["transfer"]["copied"]
    # export: safetensors + resolved manifest + metrics, verifiable
    exp = Path(st["export"]["path"])
    assert (exp / "model.safetensors").is_file() and (exp / "manifest.resolved.yaml").is_file()
    assert json.loads((exp / "metrics.json").read_text())
    rc, out, err = _run_cli(["verify", str(exp)], capsys)
    assert rc == 0, err
    # leaderboard: phase-1 rank, mean ± std, each seed, the export path
    rc, out, err = _run_cli(["leaderboard", str(sweep_dir)], capsys)
    assert rc == 0 and "seed mean ± std" in out and "phase-1 rank" in out and "101:" in out and str(exp) in out
    lb = json.loads(_run_cli(["leaderboard", str(sweep_dir), "--json"], capsys)[1])
    assert lb["fanout"]["chosen"] == fan["chosen"] and lb["export"]["path"] == str(exp)
    # the same command again launches no second fan-out and promotes the same way
    before = (sweep_dir / "promotion.json").read_text()
    mtime = (sweep_dir / "fanout" / "trials.parquet").stat().st_mtime_ns
    rc, out, err = _run_cli(["--manifest", str(p), "-q"], capsys)
    assert rc == 0, err
    assert (sweep_dir / "fanout" / "trials.parquet").stat().st_mtime_ns == mtime
    assert json.loads((sweep_dir / "promotion.json").read_text())["fanout"] == json.loads(before)["fanout"]
    assert len(list((sweep_dir / "fanout").glob("*/*/params.json"))) <= 6  # no extra trial dirs
    # another driver holds the sweep dir (a live process named in .lock): the promotion is refused, exit 2, and
    # the other driver's lock stays
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (sweep_dir / ".lock").write_text(f"{other.pid} elsewhere\n")
        rc, out, err = _run_cli(["--manifest", str(p), "-q"], capsys)
        assert rc == EXIT_USER and f"another sweeper process (pid {other.pid}) is running this sweep" in err, (rc, err)
        assert "Traceback" not in err and (sweep_dir / ".lock").read_text().split()[0] == str(other.pid)
        assert json.loads((sweep_dir / "promotion.json").read_text())["fanout"] == json.loads(before)["fanout"]
    finally:
        other.kill()
        other.wait()
    rc, out, err = _run_cli(["--manifest", str(p), "-q"], capsys)  # its process gone: the stale lock is taken over
    assert rc == 0, err
    assert not (sweep_dir / ".lock").exists()


def test_failed_gate_stops_with_verdict_and_keeps_everything(ray_session, write_manifest, tiny_qwen, capsys):
    p = write_manifest(_pipeline(tiny_qwen, "t-gate"))
    rc, out, err = _run_cli(["--manifest", str(p), "-q", "gates.val_mae=< 0.001"], capsys)  # threshold overridden
    assert rc == EXIT_GATE == 3
    line = err.strip().splitlines()[-1]
    assert "gate `val_mae < 0.001` failed" in line and "val_mae = " in line and "threshold < 0.001" in line
    assert "Traceback" not in err
    sweep_dir = next((Path(p).parent / "results").glob("t-gate-*"))
    st = json.loads((sweep_dir / "state.json").read_text())
    assert st["status"] == "gate_failed"
    assert read_promotion(sweep_dir)["verdict"] == "gate failed after phase 1"
    assert not (sweep_dir / "fanout").exists() and not (sweep_dir / "export").exists()
    rows, _ = leaderboard.load(sweep_dir)  # phase-1 results stay readable
    assert len(rows) == 3 and rows[0]["rank"] == 1
    assert (sweep_dir / "checkpoints" / "best").resolve().is_dir()
    assert yaml.safe_load((sweep_dir / "overrides.yaml").read_text()) == {"gates.val_mae": "< 0.001"}


def test_encrypted_export_decrypt_and_refusals(ray_session, write_manifest, tiny_qwen, capsys, monkeypatch, tmp_path):
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    monkeypatch.setenv("T_SWEEPER_KEY", key)
    d = _pipeline(tiny_qwen, "t-enc", export={"enabled": True, "encrypt": True, "key_env": "T_SWEEPER_KEY", "chunk_mb": 1})
    d["promotion"] = {}
    p = write_manifest(d)
    rc, out, err = _run_cli(["--manifest", str(p), "-q"], capsys)
    assert rc == 0, err
    sweep_dir = Path(out.strip().splitlines()[-1].split("results:", 1)[1].strip())
    exp = sweep_dir / "export"
    enc = exp / "model.safetensors.enc"
    assert enc.is_file() and not (exp / "model.safetensors").exists()
    # the key never lands in results, logs or metadata
    for f in sweep_dir.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert key.encode() not in f.read_bytes(), f
    dst = tmp_path / "plain.safetensors"
    rc, out, err = _run_cli(["decrypt", str(enc), str(dst), "--key-env", "T_SWEEPER_KEY"], capsys)
    assert rc == 0, err
    info = json.loads((exp / "EXPORT.json").read_text())
    import hashlib

    assert hashlib.sha256(dst.read_bytes()).hexdigest() == info["sha256_plaintext"]
    from safetensors.torch import load_file

    assert load_file(str(dst))  # real safetensors
    # wrong key: integrity exit code, one line, no partial plaintext
    monkeypatch.setenv("T_WRONG", Fernet.generate_key().decode())
    bad = tmp_path / "bad.safetensors"
    rc, out, err = _run_cli(["decrypt", str(enc), str(bad), "--key-env", "T_WRONG"], capsys)
    assert rc == EXIT_INTEGRITY and len(err.strip().splitlines()) == 1 and not bad.exists()
    assert not list(tmp_path.glob("bad.safetensors*"))
    # empty key, missing variable: user errors naming the variable, never the key
    monkeypatch.setenv("T_EMPTY", "")
    rc, out, err = _run_cli(["decrypt", str(enc), str(bad), "--key-env", "T_EMPTY"], capsys)
    assert rc == EXIT_USER and "T_EMPTY" in err and not bad.exists()
    rc, out, err = _run_cli(["verify", str(exp), "--key-env", "T_SWEEPER_KEY"], capsys)
    assert rc == 0, err


def test_missing_export_key_fails_before_any_training(write_manifest, tiny_qwen, capsys, monkeypatch):
    monkeypatch.delenv("T_NO_SUCH_KEY", raising=False)
    d = _pipeline(tiny_qwen, "t-nokey", export={"enabled": True, "encrypt": True, "key_env": "T_NO_SUCH_KEY"})
    p = write_manifest(d)
    rc, out, err = _run_cli(["--manifest", str(p), "-q"], capsys)
    assert rc == EXIT_USER and "T_NO_SUCH_KEY" in err and "Traceback" not in err
    assert not (Path(p).parent / "results").exists()


def test_from_checkpoint_is_validated_before_anything_starts(write_manifest, tiny_qwen, capsys, tmp_path):
    p = write_manifest(_pipeline(tiny_qwen, "t-fromck"))
    rc, out, err = _run_cli(["--manifest", str(p), "-q", "--from-checkpoint", str(tmp_path / "nope")], capsys)
    assert rc == EXIT_USER and "--from-checkpoint" in err and not (Path(p).parent / "results").exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a tensor file")
    rc, out, err = _run_cli(["--manifest", str(p), "-q", "--from-checkpoint", str(junk)], capsys)
    assert rc != 0 and "Traceback" not in err and not (Path(p).parent / "results").exists()


def test_from_checkpoint_promotes_without_a_sweep(ray_session, write_manifest, tiny_qwen, capsys, tmp_path):
    from sweeper.trial import ListReporter, TrialSpec, train_loop

    base = _pipeline(tiny_qwen, "t-fromck2")
    m = manifest.validate_data(copy.deepcopy({**base, "output": {"root": str(tmp_path / "r0")}}), "t", []).model_dump(mode="json")
    rep = ListReporter(str(tmp_path / "src"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
    ckpt = rep.checkpoints[-1]
    base["promotion"] = {"fanout": {"seeds": [101, 555], "candidates": 1, "epochs": 1}}
    p = write_manifest(base)
    rc, out, err = _run_cli(["--manifest", str(p), "-q", "--from-checkpoint", str(ckpt)], capsys)
    assert rc == 0, err
    sweep_dir = Path(out.strip().splitlines()[-1].split("results:", 1)[1].strip())
    assert not (sweep_dir / "sweep").exists()  # no phase-1 sweep ran
    st = read_promotion(sweep_dir)
    assert st["fanout"]["chosen"] == "from_checkpoint" and Path(st["export"]["path"]).is_dir()


# ------------------------------------------------------------------------------ stage chains


def _chain(tmp_path, tiny_qwen, gate_a="< 50"):
    a = _pipeline(tiny_qwen, "stage-a", promotion={}, gates={"val_mae": gate_a})
    a["search"]["num_samples"] = 2
    b = copy.deepcopy(a)
    b["name"], b["gates"] = "stage-b", {"val_mae": "< 50"}
    b["model"]["config_overrides"]["num_hidden_layers"] = 2  # a different size: auto -> backbone
    for n, d in (("a.yaml", a), ("b.yaml", b)):
        d["output"] = {"root": str(tmp_path / "results")}
        (tmp_path / n).write_text(yaml.safe_dump(d))
    c = {"name": "v2-v3", "stages": [{"name": "v2", "manifest": "a.yaml"}, {"name": "v3", "manifest": "b.yaml"}],
         "output": {"root": str(tmp_path / "results")}}
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(c))
    return tmp_path / "chain.yaml"


# three sweeps (two stages, then one again with --from-stage): 50 s on 2 cores, so CI's slow pass runs it; the default
# run keeps the chain's gate failure (test_chain_gate_failure_stops_before_the_next_stage)
@pytest.mark.slow
def test_chain_of_two_stages_with_a_gate_and_from_stage(ray_session, tiny_qwen, capsys, tmp_path):
    chain = _chain(tmp_path, tiny_qwen)
    rc, out, err = _run_cli(["validate", "--manifest", str(chain)], capsys)
    assert rc == 0 and "chain of 2 stages" in out
    rc, out, err = _run_cli(["--manifest", str(chain), "-q"], capsys)
    assert rc == 0, err
    state = json.loads((tmp_path / "results" / "v2-v3" / "chain.json").read_text())["stages"]
    assert state["v2"]["status"] == state["v3"]["status"] == "complete"
    assert state["v3"]["transfer"] == "backbone" and state["v3"]["init_from"] == state["v2"]["winner_checkpoint"]
    # stage v3's trials warm-started from v2's winner: backbone tensors only
    w = json.loads((Path(state["v3"]["winner_checkpoint"]) / "state.json").read_text())["transfer"]
    assert w["rule"] == "backbone" and w["copied"] and all(n.startswith("backbone.") for n in w["copied"])
    assert {n for n, _ in w["skipped"]} == {"head.proj.weight", "head.proj.bias"}
    v2_trials = Path(state["v2"]["sweep_dir"]) / "sweep" / "trials.parquet"
    v2_mtime = v2_trials.stat().st_mtime_ns
    v3_sweep = Path(state["v3"]["sweep_dir"])
    # --from-stage v3 with a changed v3 setting: v2 is not touched, only v3 runs (a new sweep for the new manifest)
    rc, out, err = _run_cli(["--manifest", str(chain), "-q", "--from-stage", "v3", "v3.training.max_epochs=1"], capsys)
    assert rc == 0, err
    assert v2_trials.stat().st_mtime_ns == v2_mtime
    state2 = json.loads((tmp_path / "results" / "v2-v3" / "chain.json").read_text())["stages"]
    assert state2["v2"] == state["v2"]
    assert Path(state2["v3"]["sweep_dir"]) != v3_sweep and state2["v3"]["status"] == "complete"
    assert state2["v3"]["init_from"] == state["v2"]["winner_checkpoint"]
    # an unknown stage and a stage without a winner are refused in one line
    rc, out, err = _run_cli(["--manifest", str(chain), "--from-stage", "v9"], capsys)
    assert rc == EXIT_USER and "no such stage" in err


def test_chain_gate_failure_stops_before_the_next_stage(ray_session, tiny_qwen, capsys, tmp_path):
    chain = _chain(tmp_path, tiny_qwen, gate_a="< 0.0001")
    rc, out, err = _run_cli(["--manifest", str(chain), "-q"], capsys)
    assert rc == EXIT_GATE and "val_mae" in err
    state = json.loads((tmp_path / "results" / "v2-v3" / "chain.json").read_text())["stages"]
    assert state["v2"]["status"] == "gate_failed" and "v3" not in state
    rc, out, err = _run_cli(["--manifest", str(chain), "-q", "--from-stage", "v3"], capsys)
    assert rc == EXIT_USER and "no recorded winner" in err
