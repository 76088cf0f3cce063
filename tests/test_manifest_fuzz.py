"""Issue 6.5: malformed manifests, generated with hypothesis, through the real CLI entry point.

Every one must give exit code 2 and exactly one line on stderr, no traceback, no Ray, and no
directory created. The bulk runs ``sweeper.cli.main`` in-process (1,000 hypothesis
examples); a handful run as real ``python -m sweeper`` subprocesses.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweeper import cli
from sweeper.errors import EXIT_USER
from tests.conftest import ROOT, TINY_QWEN

# ------------------------------------------------------------------------------ generators

_ALIAS_BOMB = (b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
               b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
               b"f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n")
_TAGS = [b"!!python/object/apply:os.system ['touch /tmp/PWNED']\n",
         b"name: !!python/name:os.system\n",
         b"name: !!python/object/new:subprocess.Popen [['true']]\n",
         b"search: !!python/object:builtins.dict {}\n",
         b"name: !custom x\n",
         b"name: !!binary aGVsbG8=\n"]
_REQUIRED = [("name",), ("trainable",), ("data",), ("search",), ("search", "space"), ("data", "generator", "kind"),
             ("search", "space", "lr", "type"), ("search", "space", "lr", "low")]


def _leaves(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, prefix + (k,))
        else:
            out.append(prefix + (k,))
    return out


def _sections(d: dict, prefix=()) -> list[tuple]:
    out = [prefix]
    for k, v in d.items():
        if isinstance(v, dict):
            out += _sections(v, prefix + (k,))
    return out


def _base(root: str) -> dict:
    m = copy.deepcopy(TINY_QWEN)
    m["output"] = {"root": root}
    return m


def _set(d: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _del(d: dict, path: tuple) -> None:
    for k in path[:-1]:
        d = d[k]
    d.pop(path[-1], None)


_BASE_FOR_PATHS = _base("R")
LEAVES = _leaves(_BASE_FOR_PATHS)
SECTIONS = _sections(_BASE_FOR_PATHS)

# a value of the wrong type for every scalar leaf: a mapping or a list never validates as one
wrong_values = st.one_of(
    st.lists(st.integers(), min_size=0, max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2).filter(lambda d: "type" not in d),
)
weird_keys = st.text(min_size=1, max_size=30).filter(
    lambda k: k.strip() and k not in ("type",))
bad_numbers = st.sampled_from([math.nan, -math.inf, math.inf, -1.0, -1e-3, 0.0])


@st.composite
def mutated(draw, root: str) -> bytes:
    """A valid manifest with one or more mutations that each make it invalid."""
    m = _base(root)
    kinds = draw(st.lists(st.sampled_from(["wrong_type", "unknown_key", "missing_key", "bad_range", "empty_space",
                                           "bad_enum"]), min_size=1, max_size=3))
    for kind in kinds:
        try:
            if kind == "wrong_type":
                leaf = draw(st.sampled_from(LEAVES))
                _set(m, leaf, draw(wrong_values))
            elif kind == "unknown_key":
                sec = draw(st.sampled_from([s for s in SECTIONS if s[:2] != ("search", "space")
                                            and s[:2] != ("model", "config_overrides") and s[:2] != ("data", "min_rows")]))
                d = m
                for k in sec:
                    d = d[k]
                key = draw(weird_keys)
                if key in d or (not sec and key in ("stages",)):
                    key = key + "_x"
                d[key] = draw(st.one_of(st.integers(), st.text(max_size=10), st.none()))
            elif kind == "missing_key":
                _del(m, draw(st.sampled_from(_REQUIRED)))
            elif kind == "bad_range":
                lr = m["search"]["space"].get("lr")
                if not isinstance(lr, dict):
                    m["search"]["space"]["lr"] = lr = {"type": "loguniform", "low": 1e-3, "high": 1e-2}
                field = draw(st.sampled_from(["low", "high", "both_swapped", "num_samples", "max_epochs"]))
                if field == "both_swapped":
                    lr.update(type="uniform", low=0.5, high=draw(st.sampled_from([0.5, 0.1, -0.5])))
                elif field == "num_samples":
                    m["search"]["num_samples"] = draw(st.integers(max_value=0))
                elif field == "max_epochs":
                    m["training"]["max_epochs"] = draw(st.integers(max_value=0))
                else:
                    lr[field] = draw(bad_numbers)
                    if lr.get("type") not in ("loguniform",):
                        lr["type"] = "loguniform"
            elif kind == "empty_space":
                m["search"]["space"] = {}
            elif kind == "bad_enum":
                path = draw(st.sampled_from([("search", "algorithm"), ("scheduler", "type"), ("selection", "mode"),
                                             ("model", "pooling"), ("trainable",), ("search", "space", "lr", "type")]))
                _set(m, path, draw(st.text(max_size=12).filter(
                    lambda s: s not in ("optuna", "random", "asha", "none", "min", "max", "last", "mean",
                                        "qwen_regression", "dinov2_classifier", "loguniform", "uniform", "int",
                                        "quniform", "choice"))))
        except (KeyError, TypeError):
            m["name"] = [draw(st.integers())]  # an earlier mutation removed the path: still invalid
    return yaml.safe_dump(m, sort_keys=False, allow_unicode=draw(st.booleans())).encode()


@st.composite
def raw_bytes(draw, root: str) -> bytes:
    """Malformed at the YAML/byte level."""
    good = yaml.safe_dump(_base(root), sort_keys=False).encode()
    kind = draw(st.sampled_from(["dup", "non_utf8", "tag", "bomb", "big", "not_mapping", "syntax", "nul", "empty"]))
    if kind == "dup":
        lines = good.splitlines(keepends=True)
        top = [ln for ln in lines if ln[:1].isalpha()]
        return good + draw(st.sampled_from(top))
    if kind == "non_utf8":
        at = draw(st.integers(0, len(good)))
        junk = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"]))
        return good[:at] + junk + good[at:]
    if kind == "tag":
        return draw(st.sampled_from(_TAGS)) + (good if draw(st.booleans()) else b"")
    if kind == "bomb":
        return _ALIAS_BOMB
    if kind == "big":
        return good + b"# " + b"x" * draw(st.integers(1_000_001, 1_200_000)) + b"\n"
    if kind == "not_mapping":
        return draw(st.sampled_from([b"- 1\n- 2\n", b"42\n", b"'just a string'\n", b"null\n", b"[]\n"]))
    if kind == "nul":
        at = draw(st.integers(0, len(good)))
        return good[:at] + b"\x00" + good[at:]
    if kind == "empty":
        return draw(st.sampled_from([b"", b"   \n", b"# only a comment\n", b"---\n"]))
    # syntax: unbalanced brackets / bad indentation spliced in
    at = draw(st.integers(0, len(good)))
    return good[:at] + draw(st.sampled_from([b"\n  - [unclosed\n", b"\n\t tab: 1\n", b": : :\n", b"\n{a: 1\n"])) + good[at:]


def manifests(root: str):
    return st.one_of(mutated(root), raw_bytes(root))


# ------------------------------------------------------------------------------ harness


def _snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _check_one(capsys, ray_starts: list, workdir: Path, data: bytes, verb: list[str], stats: dict) -> None:
    mf = workdir / "m.yaml"
    mf.write_bytes(data)
    before = _snapshot(workdir)
    code = cli.main([*verb[:1], "--manifest", str(mf), *verb[1:]] if verb else ["--manifest", str(mf)])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == EXIT_USER, (code, data[:300], err[-500:], out[-500:])
    assert len(lines) == 1, (data[:300], err[:2000])
    assert lines[0].startswith("error: "), lines[0][:300]
    assert "Traceback" not in err + out
    assert not ray_starts, "Ray was started before the manifest was refused"
    assert _snapshot(workdir) == before, "a directory or file was created"
    stats[lines[0].split(":", 2)[-1][:40]] = stats.get(lines[0].split(":", 2)[-1][:40], 0) + 1


def _run_fuzz(tmp_path, capsys, ray_starts: list, n: int) -> None:
    workdir = tmp_path / "w"
    workdir.mkdir()
    root = str(workdir / "results")  # must never appear
    cwd = os.getcwd()
    os.chdir(workdir)  # a relative default root ("results") would land here
    stats: dict = {}
    seen = [0]
    try:
        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(data=manifests(root), verb=st.sampled_from([[], ["run", "--dry-run"], ["validate"], ["run"]]))
        def one(data, verb):
            seen[0] += 1
            _check_one(capsys, ray_starts, workdir, data, verb, stats)

        one()
    finally:
        os.chdir(cwd)
    assert seen[0] >= n * 0.9, seen[0]
    assert not (workdir / "results").exists()
    print(f"\n{seen[0]} malformed manifests: all exit 2 with one line; {len(stats)} distinct messages")


def test_1000_malformed_manifests_one_line_exit_2(tmp_path, capsys, ray_starts):
    # ~15 s for 1,000 in-process runs on 2 loaded cores: cheap enough for the default selection
    _run_fuzz(tmp_path, capsys, ray_starts, 1000)


def test_ten_megabyte_manifest(tmp_path, capsys):
    mf = tmp_path / "big.yaml"
    with open(mf, "wb") as fh:
        fh.write(yaml.safe_dump(_base(str(tmp_path / "r"))).encode())
        fh.write(b"# " + b"x" * (10 << 20) + b"\n")
    assert cli.main(["--manifest", str(mf)]) == EXIT_USER
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "over the 1000000-byte limit" in err
    assert not (tmp_path / "r").exists()


def test_unknown_key_with_newline_stays_one_line(tmp_path, capsys):
    m = _base(str(tmp_path / "r"))
    m["search"]["evil\nkey\r\n"] = 1
    m["name\u2028x"] = 2  # a Unicode line separator: str.splitlines() breaks on it too
    mf = tmp_path / "m.yaml"
    mf.write_text(yaml.safe_dump(m))
    assert cli.main(["--manifest", str(mf)]) == EXIT_USER
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "evil" in err, err


# ------------------------------------------------------------------------- real subprocesses

_SUBPROCESS_CASES = {
    "wrong_type": yaml.safe_dump({**_base("R"), "search": {**TINY_QWEN["search"], "num_samples": [1]}}).encode(),
    "unknown_key": yaml.safe_dump({**_base("R"), "bogus": 1}).encode(),
    "missing_key": yaml.safe_dump({k: v for k, v in _base("R").items() if k != "search"}).encode(),
    "nan_range": yaml.safe_dump({**_base("R"), "search": {**TINY_QWEN["search"],
                                 "space": {"lr": {"type": "uniform", "low": math.nan, "high": 1.0}}}}).encode(),
    "negative_range": yaml.safe_dump({**_base("R"), "search": {**TINY_QWEN["search"],
                                      "space": {"lr": {"type": "loguniform", "low": -1.0, "high": 1.0}}}}).encode(),
    "empty_space": yaml.safe_dump({**_base("R"), "search": {**TINY_QWEN["search"], "space": {}}}).encode(),
    "duplicate_key": b"name: a\nname: b\n",
    "non_utf8": b"name: \xff\xfe\n",
    "alias_bomb": _ALIAS_BOMB,
    "python_tag": _TAGS[0],
    "ten_mb": b"name: a\n# " + b"x" * (10 << 20) + b"\n",
}


@pytest.mark.parametrize("case", sorted(_SUBPROCESS_CASES))
def test_malformed_manifest_as_real_subprocess(tmp_path, case):
    data = _SUBPROCESS_CASES[case].replace(b"output:\n  root: R\n", f"output:\n  root: {tmp_path / 'results'}\n".encode())
    mf = tmp_path / "m.yaml"
    mf.write_bytes(data)
    ray_tmp = tmp_path / "raytmp"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "sweeper", "--manifest", str(mf)], capture_output=True, text=True,
                       env=env, cwd=work, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == EXIT_USER, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert list(ray_tmp.iterdir()) == [], "Ray was started"
    assert list(work.iterdir()) == [] and not (tmp_path / "results").exists()
    assert not Path("/tmp/PWNED").exists()
