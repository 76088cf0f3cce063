"""Schema rules one by one, overrides, and the YAML loader's refusals."""

from __future__ import annotations

import copy

import pytest

from sweeper import manifest
from sweeper.errors import ManifestError, UserError
from tests.conftest import TINY_QWEN


def check(data: dict, overrides=None):
    data = copy.deepcopy(data)
    applied, problems = manifest.apply_overrides(data, overrides or [])
    return manifest.validate_data(data, "m.yaml", problems)


def problems_of(data: dict, overrides=None) -> list[str]:
    with pytest.raises(ManifestError) as ei:
        check(data, overrides)
    return ei.value.problems


def edit(**paths):
    d = copy.deepcopy(TINY_QWEN)
    for dotted, value in paths.items():
        keys = dotted.split("__")
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is KeyError:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return d


def test_valid_manifest_loads():
    m = check(TINY_QWEN)
    assert m.trainable == "qwen_regression" and m.search.num_samples == 2


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(bogus=1), "`bogus`: unknown key"),
        (dict(search__bogus=1), "`search.bogus`: unknown key"),
        (dict(name=KeyError), "`name`: required key is missing"),
        (dict(search__num_samples=0), "`search.num_samples`"),
        (dict(search__num_samples="many"), "`search.num_samples`"),
        (dict(search__max_concurrent=-1), "`search.max_concurrent`"),
        (dict(search__algorithm="grid"), "`search.algorithm`"),
        (dict(search__space={}), "`search.space`"),
        (dict(search__space={"lr": {"type": "loguniform", "low": -1, "high": 1}}), "`search.space.lr.low`"),
        (dict(search__space={"lr": {"type": "weird"}}), "`search.space.lr`"),
        (dict(search__space={"lr": {"type": "uniform", "low": 1, "high": 1}}), "`search.space.lr.low` is 1.0 but must be < `search.space.lr.high`"),
        (dict(search__space={"lr": {"type": "uniform", "low": float("nan"), "high": 1}}), "`search.space.lr.low`"),
        (dict(search__space={"batch_size": {"type": "choice", "values": []}}), "`search.space.batch_size.values`"),
        (dict(search__space={"batch_size": {"type": "choice", "values": [8, 8]}}), "duplicates"),
        (dict(search__space={"dropout": {"type": "quniform", "low": 0, "high": 0.1, "q": 0.5}}), "`search.space.dropout.q`"),
        (dict(search__space={"batch_size": {"type": "int", "low": 0, "high": 4, "log": True}}), "must be >= 1 when `log`"),
        (dict(search__space={"learning_rate": 0.1}), "has no hyperparameter 'learning_rate'"),
        (dict(scheduler__grace_period=5), "`scheduler.grace_period` is 5 but must be <= `scheduler.max_t` (3)"),
        (dict(scheduler__max_t=5), "`scheduler.max_t` is 5 but trials stop at `training.max_epochs` (3)"),
        # training_iteration counts epochs too (trial.iteration_is_epoch): the same bound
        (dict(scheduler__max_t=5, scheduler__time_attr="training_iteration"),
         "`scheduler.max_t` is 5 but trials stop at `training.max_epochs` (3)"),
        (dict(scheduler__reduction_factor=1), "`scheduler.reduction_factor`"),
        (dict(scheduler__type="pbt"), "`scheduler.type`"),
        (dict(selection__metric="val_acc"), "reports no metric 'val_acc'"),
        (dict(selection__mode="max"), "`selection.mode` is 'max' but val_mae is better when lower"),
        (dict(trainable="qwen"), "unknown trainable 'qwen'; known: dinov2_classifier, qwen_regression"),
        (dict(resources__gpus=1.5), "`resources.gpus`"),
        (dict(resources__cpus=0), "`resources.cpus`"),
        (dict(model__size="huge"), "`model.size`: unknown size 'huge'"),
        (dict(model__path="/nonexistent/weights"), "`model.path`: /nonexistent/weights does not exist"),
        (dict(data__generator=KeyError), "give exactly one of `paths`"),
        (dict(data__generator__kind="images_synthetic"), "`data.generator.kind`"),
        (dict(data__paths={"train": "/nope.jsonl"}), "give exactly one of"),
        (dict(name="../escape"), "is not a safe name"),
        (dict(training__precision="fp8"), "`training.precision`"),
    ],
)
def test_schema_rule(change, key):
    probs = problems_of(edit(**change))
    assert any(key in p for p in probs), probs


def test_fp16_refused_for_dinov2_with_reason():
    d = copy.deepcopy(TINY_QWEN)
    d.update(trainable="dinov2_classifier", selection={"metric": "val_acc", "mode": "max"},
             data={"generator": {"kind": "images_synthetic"}}, training={"max_epochs": 3, "precision": "fp16"})
    d["model"] = {"size": "tiny"}
    probs = problems_of(d)
    assert any("fp16 is refused for dinov2_classifier" in p and "overflow" in p for p in probs), probs


def test_every_problem_reported_at_once():
    bad = edit(bogus=1, trainable="nope", name="a/b", search__num_samples=0)
    probs = problems_of(bad)
    text = " ".join(probs)
    for k in ("`bogus`", "`trainable`", "`name`", "`search.num_samples`"):
        assert k in text


def test_overrides_typed_by_schema_and_unknown_refused():
    m = check(TINY_QWEN, ["search.num_samples=5", "search.space.lr.high=0.05", "training.seed=7", "model.pooling=last"])
    assert m.search.num_samples == 5 and m.training.seed == 7 and m.model.pooling == "last"
    assert m.search.space["lr"].high == 0.05
    probs = problems_of(TINY_QWEN, ["search.num_sample=5", "training.max_epochs=abc", "noequals"])
    text = " ".join(probs)
    assert "override `search.num_sample`: unknown key" in text
    assert "`training.max_epochs`" in text
    assert "expected key=value" in text


def test_override_can_add_space_entry():
    m = check(TINY_QWEN, ["search.space.dropout=0.1"])
    assert m.search.space["dropout"] == 0.1


@pytest.mark.parametrize(
    "text, msg",
    [
        (b"name: a\nname: b\n", "duplicate key 'name'"),
        (b"!!python/object/apply:os.system ['echo hi']\n", "python object tag"),
        (b"a: !!python/name:os.system\n", "python object tag"),
        (b"\xff\xfe bad", "not UTF-8"),
        (b"a: [1, 2\n", "invalid YAML"),
        (b"", "is empty"),
        (b"- 1\n- 2\n", "top level must be a mapping"),
        (b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
         b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", "alias bomb"),
    ],
)
def test_yaml_refusals(tmp_path, text, msg):
    p = tmp_path / "m.yaml"
    p.write_bytes(text)
    with pytest.raises(UserError) as ei:
        manifest.load(p)
    assert msg in str(ei.value)
    assert "\n" not in str(ei.value)


def test_size_limit(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_bytes(b"# " + b"x" * (manifest.MAX_MANIFEST_BYTES + 10) + b"\n")
    with pytest.raises(UserError, match="over the"):
        manifest.load(p)


def test_identity_stable_and_sensitive(write_manifest):
    p = write_manifest(TINY_QWEN)
    a, b = manifest.load(p), manifest.load(p)
    assert a.identity() == b.identity()
    assert manifest.load(p, ["search.seed=1"]).identity() != a.identity()
    assert manifest.load(p, ["output.root=/tmp/elsewhere"]).identity() == a.identity()


def test_identity_survives_settings_added_later():
    """A sweep started before a setting existed keeps its directory: the demo manifest's identity as computed
    by the code of 2b868c2, before training.micro_batch was added (re-running that manifest must resume that
    sweep). If this fails, a schema change moved every sweep's directory: a setting added with a default
    belongs in manifest.LATER_DEFAULTS; a changed default really changes results and this value with it."""
    from tests.conftest import ROOT

    demo = ROOT / "search_spaces/qwen-tiny_regression_cpu.yaml"
    assert manifest.load(demo).identity() == "2d3cf794bc"
    assert manifest.load(demo, ["training.strategy=plain"]).identity() == "aeea5b08be"
    # a value other than the default is part of the identity
    assert manifest.load(demo, ["training.strategy=plain", "training.micro_batch=4"]).identity() not in ("aeea5b08be", "2d3cf794bc")


def test_promotion_variant_needs_a_checkpoint_at_every_rung():
    ok = ["scheduler.type=asha", "scheduler.variant=promotion", "scheduler.grace_period=1", "scheduler.reduction_factor=3",
          "scheduler.max_t=9", "training.max_epochs=9"]
    check(TINY_QWEN, ok + ["training.checkpoint_every=1"])
    probs = problems_of(TINY_QWEN, ok + ["training.checkpoint_every=3"])  # nothing at rung 1
    assert any("checkpoint_every=3" in p and "epoch(s) 1" in p for p in probs), probs
    check(TINY_QWEN, ok + ["training.checkpoint_every=3", "scheduler.variant=stopping"])  # stops, never resumes
    probs = problems_of(TINY_QWEN, ok + ["training.checkpoint_every=3", "scheduler.time_attr=training_iteration"])
    assert any("checkpoint_every=3" in p and "epoch(s) 1" in p for p in probs), probs
    probs = problems_of(TINY_QWEN, ok + ["scheduler.variant=halving"])
    assert any("variant" in p for p in probs), probs
