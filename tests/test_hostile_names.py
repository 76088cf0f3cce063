"""Issue 6.6: hostile names and planted symlinks, end to end through the CLI.

test_paths.py proves ``safe_name``/``contained``/``ensure_dir`` on their own. Here the same 200+
hostile names go in where a user puts them (the manifest ``name``, a chain's name and stage
names, an override, ``output.root``), and symlinks are planted where a sweep writes (the sweep dir
itself, a re-run dir, ``sweep/``, ``logs/``, ``.lock``, ``latest``): nothing is ever written
outside the results root, and each refusal is one line with exit code 2.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweeper import cli, manifest
from sweeper.errors import EXIT_USER, UserError
from sweeper.paths import safe_name
from tests.conftest import TINY_QWEN
from tests.test_paths import HAND_HOSTILE, hostile_text


def _tree(top: Path) -> dict[str, bytes | None]:
    """Every entry under ``top`` (not following links), with file contents."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(top))
            out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """tmp/work is the cwd, tmp/work/results the root, tmp/outside where an escape would land."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched\n")
    monkeypatch.chdir(work)
    return tmp_path, work, outside


def _manifest(path: Path, root: Path, **changes) -> Path:
    m = copy.deepcopy(TINY_QWEN)
    m["output"] = {"root": str(root)}
    m["export"] = {"enabled": False}
    m.update(changes)
    path.write_text(yaml.safe_dump(m, sort_keys=False, allow_unicode=True))
    return path


_RAY_STARTS: list = []


@pytest.fixture(autouse=True)
def _record_ray_starts(ray_starts):
    global _RAY_STARTS
    _RAY_STARTS = ray_starts
    yield


def _refused_by_cli(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == EXIT_USER, (argv, code, err[-1000:], out[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err + out, err
    assert not _RAY_STARTS, "Ray was started before the input was refused"
    return lines[0]


def _hostile_strings() -> list[str]:
    names = [n for n in HAND_HOSTILE if isinstance(n, str)]
    extra: list[str] = []

    @settings(max_examples=150, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hostile_text)
    def collect(s):
        try:
            safe_name(s, "x")
        except UserError:
            extra.append(s)

    collect()
    seen, out = set(), []
    for n in names + extra:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


HOSTILE = _hostile_strings()


def test_hostile_set_is_large_and_varied():
    assert len(HOSTILE) >= 200, len(HOSTILE)
    kinds = {"traversal": any(".." in n for n in HOSTILE), "absolute": any(n.startswith("/") for n in HOSTILE),
             "nul": any("\x00" in n for n in HOSTILE), "long": any(len(n) >= 300 for n in HOSTILE),
             "lookalike": any("\u0430" in n or "\uff0e" in n for n in HOSTILE)}
    assert all(kinds.values()), kinds


def test_hostile_manifest_names_never_write_outside(sandbox, capsys):
    tmp, work, outside = sandbox
    before = _tree(tmp)
    mf = tmp / "m.yaml"
    for name in HOSTILE:
        _manifest(mf, work / "results", name=name)
        for argv in (["--manifest", str(mf)], ["validate", "--manifest", str(mf)]):
            line = _refused_by_cli(capsys, argv)
            assert "`name`" in line, (ascii(name), line)
    after = _tree(tmp)
    assert {k: v for k, v in after.items() if k != "m.yaml"} == {k: v for k, v in before.items() if k != "m.yaml"}
    assert not (work / "results").exists()
    print(f"\n{len(HOSTILE)} hostile names refused as manifest name, run and validate")


def test_hostile_name_by_override(sandbox, capsys):
    tmp, work, outside = sandbox
    mf = _manifest(tmp / "m.yaml", work / "results", name="fine")
    for name in ("../x", "/etc/x", "..", "a/b", "\u0430bc", "x" * 300, "CON", "a..b", "~root"):
        _refused_by_cli(capsys, ["--manifest", str(mf), f"name={name}"])
    assert not (work / "results").exists()
    assert _tree(outside) == {"victim.txt": b"untouched\n"}


def test_hostile_chain_and_stage_names(sandbox, capsys):
    tmp, work, outside = sandbox
    _manifest(tmp / "stage.yaml", work / "results", name="stage")
    for bad in HOSTILE[:60]:
        for chain in ({"name": "chain", "stages": [{"name": bad, "manifest": "stage.yaml"}]},
                      {"name": bad, "stages": [{"name": "s1", "manifest": "stage.yaml"}]}):
            chain["output"] = {"root": str(work / "results")}
            p = tmp / "chain.yaml"
            p.write_text(yaml.safe_dump(chain, allow_unicode=True))
            _refused_by_cli(capsys, ["--manifest", str(p)])
    assert not (work / "results").exists()
    assert _tree(outside) == {"victim.txt": b"untouched\n"}


@pytest.mark.parametrize("root", ["a\x00b", "", "   ", "x\ny", "r" * 5000])
def test_unusable_output_root_is_one_line(sandbox, capsys, root):
    tmp, work, outside = sandbox
    mf = _manifest(tmp / "m.yaml", Path("unused"))
    data = yaml.safe_load(mf.read_text())
    data["output"]["root"] = root
    mf.write_text(yaml.safe_dump(data))
    line = _refused_by_cli(capsys, ["--manifest", str(mf)])
    assert "output.root" in line
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------ planted symlinks


def _identity(mf: Path) -> str:
    loaded = manifest.load(mf)
    return f"{loaded.manifest.name}-{loaded.identity()}"


@pytest.mark.parametrize("where", ["sweep_dir", "rerun_dir"])
def test_symlink_named_like_the_sweep_dir_is_refused(sandbox, capsys, where):
    tmp, work, outside = sandbox
    root = work / "results"
    root.mkdir()
    mf = _manifest(tmp / "m.yaml", root, name="planted")
    base = _identity(mf)
    (root / (base if where == "sweep_dir" else f"{base}.2")).symlink_to(outside, target_is_directory=True)
    if where == "rerun_dir":
        (root / base).mkdir()  # the original run exists; the newest "re-run" is the planted link
    before = _tree(tmp)
    line = _refused_by_cli(capsys, ["--manifest", str(mf)])
    assert "symlink" in line or "outside" in line, line
    assert _tree(outside) == {"victim.txt": b"untouched\n"}
    assert _tree(tmp) == before


def test_symlinks_planted_inside_the_sweep_dir(sandbox, capsys):
    """A real sweep dir whose ``sweep/``, ``logs/sweeper.log`` and ``.lock`` lead outside: the run
    is refused before Ray starts, and nothing outside is written through the links."""
    tmp, work, outside = sandbox
    root = work / "results"
    mf = _manifest(tmp / "m.yaml", root, name="inside")
    sweep_dir = root / _identity(mf)
    (sweep_dir / "logs").mkdir(parents=True)
    (outside / "phase").mkdir()
    (sweep_dir / "sweep").symlink_to(outside / "phase", target_is_directory=True)
    (sweep_dir / "logs" / "sweeper.log").symlink_to(outside / "victim.txt")
    (sweep_dir / ".lock").symlink_to(outside / "victim.txt")
    (root / "latest").symlink_to(outside, target_is_directory=True)
    line = _refused_by_cli(capsys, ["--manifest", str(mf)])
    assert "sweep" in line and "symlink" in line, line
    assert _tree(outside) == {"victim.txt": b"untouched\n", "phase": None}
    assert os.readlink(root / "latest") == sweep_dir.name  # replaced, not followed
    # the logs dir itself as a link is refused too
    (sweep_dir / "sweep").unlink()
    os.remove(sweep_dir / "logs" / "sweeper.log") if (sweep_dir / "logs" / "sweeper.log").is_symlink() else None
    for p in (sweep_dir / "logs").iterdir():
        p.unlink()
    (sweep_dir / "logs").rmdir()
    (sweep_dir / "logs").symlink_to(outside, target_is_directory=True)
    line = _refused_by_cli(capsys, ["--manifest", str(mf)])
    assert "logs" in line, line
    assert _tree(outside) == {"victim.txt": b"untouched\n", "phase": None}
