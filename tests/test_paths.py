"""Names become paths only after the allow-list and the containment check (sweeper/paths.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweeper import paths
from sweeper.errors import EXIT_USER, UserError
from sweeper.paths import check_inside, contained, ensure_dir, safe_name

# --------------------------------------------------------------------------------------------
# Hostile names, by hand. Every one of these must be refused by safe_name.
# --------------------------------------------------------------------------------------------
HAND_HOSTILE = [
    # traversal and separators
    "..", ".", "../x", "../../etc/passwd", "a/../../b", "a/..", "x/../../../../tmp/pwn",
    "..\\x", "a\\..\\..\\b", "\\", "a\\b", "/", "/etc/passwd", "/tmp", "//server/share",
    "\\\\server\\share", "C:\\Windows", "C:", "c:foo", "a/b", "a//b", "./a", "a/.", "...", "....",
    "a..b", "v2..stage", "trial.", "trial..", ".hidden", ".git", "-rf", "_private",
    # encodings of traversal
    "%2e%2e", "%2e%2e%2fetc", "%2E%2E%2F", "..%2f", "%2f", "%00", "%252e%252e", "&#46;&#46;",
    "..%c0%af", "%c0%ae%c0%ae", "\u2024\u2024", "\uff0e\uff0e", "\uff0e\uff0e\uff0fx",
    # control characters
    "\x00", "a\x00b", "run\x00.txt", "\n", "a\nb", "name\n", "\r", "a\rb", "\t", "a\tb",
    "\x1b[31mred", "a\x7fb", "a\x0bb", "a\x0cb",
    # emptiness and whitespace
    "", " ", "  ", " a", "a ", "a b", "\u00a0", "a\u00a0b", "\u3000", "\u200b", "a\u200bb",
    "\ufeffname", "a\u2028b", "a\u2029b",
    # home, variables, globs, shell metacharacters
    "~", "~root", "~/x", "$HOME", "${HOME}", "$(id)", "`id`", "a;rm -rf ~", "a&&b", "a|b", "a>b",
    "a<b", "*", "a*", "?", "a?", "[a]", "{a,b}", "a!b", "a#b", "a'b", 'a"b', "a(b)", "a=b",
    "a,b", "a:b", "a@b", "a+b", "a^b", "a%b",
    # look-alike Unicode (Cyrillic, Greek, fullwidth, mathematical, ligatures, accents)
    "qwen-d\u0435mo", "\u0430dmin", "tri\u0430l_0001", "\u03bfptuna", "\uff51wen", "\uff11\uff12",
    "\U0001d42a\U0001d430\U0001d41e\U0001d427", "\ufb01le", "caf\u00e9", "cafe\u0301", "\u212aelvin",
    "\u0131d", "r\u0438n", "\u202eexe.txt", "a\u2044b", "a\u2215b", "a\u29f5b", "a\uff0fb",
    "\u2025", "\u00b7",
    # Windows device names (any case, any extension)
    "CON", "con", "Con", "PRN", "AUX", "NUL", "nul", "COM1", "com9", "COM0", "LPT1", "lpt9",
    "LPT0", "NUL.txt", "con.tar.gz", "aux.log", "Com1.json",
    # too long
    "a" * 65, "a" * 300, "x" * 4096, "trial_" + "9" * 100,
    # not strings at all
]
NOT_STRINGS = [None, 7, 3.5, b"abc", b"../x", ["a"], Path("a"), Path("../x")]

VALID = ["qwen-demo", "trial_0001", "v2.stage", "a", "A", "0", "9lives", "run-2024.06.01",
         "x" * 64, "CONSOLE", "nullable", "COM10", "lpt10", "auxiliary", "con-fig", "a.b.c",
         "a_-.b", "Z9"]


@pytest.fixture()
def sandbox(tmp_path):
    """tmp_path/root is the root; tmp_path/outside is where an escape would land."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    return tmp_path, root, outside


def _tree(top: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for n in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, n), top))
    return found


def _assert_nothing_outside(parent: Path, root: Path, before: set[str]) -> None:
    """Every entry under the sandbox parent that was not there before lies under root/."""
    new = _tree(parent) - before
    escaped = sorted(p for p in new if not (p == "root" or p.startswith("root" + os.sep)))
    assert escaped == [], f"created outside the root: {escaped}"
    # and nothing inside the root is a symlink (ensure_dir never creates one)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            assert not os.path.islink(os.path.join(dirpath, n))


def _attempt(root: Path, name) -> str:
    """Try ``name`` as a name; return 'refused' or 'accepted' and check the accepted case."""
    try:
        safe_name(name, "study name")
    except UserError as exc:
        msg = str(exc)
        assert exc.exit_code == EXIT_USER
        assert msg.startswith("study name "), msg
        assert "is not a safe name" in msg
        assert "\n" not in msg and "\r" not in msg and "\x00" not in msg
        assert msg.isprintable(), ascii(msg)
        assert len(msg) < 400, len(msg)
        # The other entry points refuse it too, and nothing is created.
        with pytest.raises(UserError):
            contained(root, name)
        with pytest.raises(UserError):
            ensure_dir(root, name)
        with pytest.raises(UserError):
            ensure_dir(root, "ok", name)
        return "refused"
    made = ensure_dir(root, name)
    assert made == Path(os.path.realpath(root)) / name
    assert made.is_dir() and not made.is_symlink()
    assert made.parent == Path(os.path.realpath(root))
    return "accepted"


# --------------------------------------------------------------------------------------------
# Hypothesis: arbitrary text, traversal-shaped text, and allow-list-shaped text.
# --------------------------------------------------------------------------------------------
_FRAGMENTS = ["..", ".", "/", "\\", "\x00", "~", "%2e", "%2f", "$", "`", ";", " ", "\n", "C:",
              "a", "run", "0", "-", "_", "\u0430", "\uff0e", "\u2215", "CON", "nul", "*"]

hostile_text = st.one_of(
    st.text(max_size=80),  # anything at all, including surrogates-free Unicode and controls
    st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=12).map("".join),
    st.text(alphabet=st.characters(codec="ascii"), min_size=0, max_size=70),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True),  # near the allow-list
)


def test_hand_list_is_refused_and_large_enough():
    assert len(HAND_HOSTILE) + len(NOT_STRINGS) >= 150
    for name in HAND_HOSTILE + NOT_STRINGS:
        with pytest.raises(UserError):
            safe_name(name, "study name")


def test_200_hostile_names_never_escape_the_root(sandbox):
    parent, root, outside = sandbox
    before = _tree(parent)
    outcomes: dict[object, str] = {}

    for name in HAND_HOSTILE + NOT_STRINGS:
        assert _attempt(root, name) == "refused", ascii(name)
        outcomes[repr(name)] = "refused"

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(hostile_text)
    def attempt(name):
        outcomes[repr(name)] = _attempt(root, name)

    attempt()

    assert len(outcomes) >= 200, len(outcomes)
    refused = sum(1 for v in outcomes.values() if v == "refused")
    assert refused >= 200, refused  # the bulk are hostile; a few generated ones are fine names
    assert _tree(outside) == set()
    _assert_nothing_outside(parent, root, before)


@pytest.mark.parametrize("name", VALID)
def test_valid_names_pass(sandbox, name):
    _, root, _ = sandbox
    assert safe_name(name, "trial id") == name
    assert contained(root, name) == Path(os.path.realpath(root)) / name
    made = ensure_dir(root, name, "sub")
    assert made.is_dir()
    assert made == Path(os.path.realpath(root)) / name / "sub"


def test_error_message_format():
    with pytest.raises(UserError) as e:
        safe_name("../x", "study name")
    assert str(e.value) == (
        "study name '../x' is not a safe name: use 1-64 ASCII letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


def test_error_message_is_one_bounded_printable_line_for_long_and_nul_values():
    for bad in ["a" * 300, "x\x00" * 200, "\n" * 500, "\u0430" * 100, "\u202e" + "b" * 1000]:
        with pytest.raises(UserError) as e:
            safe_name(bad, "trial id")
        msg = str(e.value)
        assert "\n" not in msg and msg.isprintable() and msg.isascii()
        assert len(msg) < 250, msg
    with pytest.raises(UserError) as e:
        safe_name("a" * 300, "trial id")
    assert "(300 chars)" in str(e.value)


def test_lookalike_is_shown_escaped():
    with pytest.raises(UserError) as e:
        safe_name("qwen-d\u0435mo", "study name")  # Cyrillic 'е'
    assert "\\u0435" in str(e.value)


# --------------------------------------------------------------------------------------------
# Symlinks planted in the tree
# --------------------------------------------------------------------------------------------
def test_planted_symlink_to_outside_is_refused(sandbox):
    parent, root, outside = sandbox
    (root / "evil").symlink_to(outside, target_is_directory=True)
    before = _tree(parent)
    with pytest.raises(UserError) as e:
        ensure_dir(root, "evil", "x")
    assert "evil" in str(e.value)
    with pytest.raises(UserError):
        contained(root, "evil", "x")
    with pytest.raises(UserError):
        contained(root, "evil")
    with pytest.raises(UserError):
        check_inside(root, "evil/x")
    with pytest.raises(UserError):
        check_inside(root, root / "evil" / "x")
    assert list(outside.iterdir()) == []
    assert _tree(parent) == before


def test_symlink_deeper_in_the_chain_and_relative_symlink(sandbox):
    _, root, outside = sandbox
    ensure_dir(root, "study", "trial_0001")
    (root / "study" / "trial_0001" / "ckpt").symlink_to("../../../outside")
    with pytest.raises(UserError) as e:
        ensure_dir(root, "study", "trial_0001", "ckpt", "epoch_1")
    assert "ckpt" in str(e.value)
    with pytest.raises(UserError):
        contained(root, "study", "trial_0001", "ckpt")
    assert list(outside.iterdir()) == []


def test_symlink_to_file_outside_and_dangling_symlink(sandbox):
    _, root, outside = sandbox
    (outside / "secret").write_text("s")
    (root / "leak").symlink_to(outside / "secret")
    (root / "dangling").symlink_to(outside / "not-yet")
    for name in ("leak", "dangling"):
        with pytest.raises(UserError):
            contained(root, name)
        with pytest.raises(UserError):
            ensure_dir(root, name)
        with pytest.raises(UserError):
            check_inside(root, name)
    assert not (outside / "not-yet").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_symlink_loop_is_refused(sandbox):
    _, root, _ = sandbox
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(UserError):
        ensure_dir(root, "loop", "x")


def test_symlink_pointing_back_inside_root(sandbox):
    _, root, _ = sandbox
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")
    # Resolution stays inside the root, so contained/check_inside accept it ...
    assert contained(root, "alias", "x") == Path(os.path.realpath(root)) / "real" / "x"
    assert check_inside(root, "alias") == Path(os.path.realpath(root)) / "real"
    # ... but ensure_dir never creates through a symlink below the root.
    with pytest.raises(UserError):
        ensure_dir(root, "alias", "x")
    assert not (root / "real" / "x").exists()


def test_file_where_a_directory_is_expected(sandbox):
    _, root, _ = sandbox
    (root / "study").write_text("not a dir")
    with pytest.raises(UserError) as e:
        ensure_dir(root, "study", "t1")
    assert "not a directory" in str(e.value)


def test_root_may_itself_be_a_symlink(sandbox):
    parent, root, _ = sandbox
    link = parent / "results-link"
    link.symlink_to(root, target_is_directory=True)
    made = ensure_dir(link, "study", "trial_0001")
    assert made == Path(os.path.realpath(root)) / "study" / "trial_0001"
    assert (root / "study" / "trial_0001").is_dir()


def test_root_is_created_and_existing_dirs_are_reused(tmp_path):
    root = tmp_path / "new" / "results"
    a = ensure_dir(root, "s", "t")
    b = ensure_dir(root, "s", "t")
    assert a == b and a.is_dir()
    assert ensure_dir(root) == Path(os.path.realpath(root))


def test_swap_to_symlink_after_mkdir_is_refused(sandbox, monkeypatch):
    """TOCTOU: an attacker replaces the directory we just created with a symlink to outside."""
    parent, root, outside = sandbox
    real_mkdir = os.mkdir

    def racing_mkdir(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        if os.fspath(path) == "study":
            full = root / "study"
            os.rmdir(full)
            os.symlink(outside, full)

    monkeypatch.setattr(paths.os, "mkdir", racing_mkdir)
    with pytest.raises(UserError):
        ensure_dir(root, "study", "trial_0001")
    assert list(outside.iterdir()) == []


def test_swap_between_lstat_and_open_is_refused(sandbox, monkeypatch):
    """The O_NOFOLLOW open catches a swap that happens after the lstat check."""
    _, root, outside = sandbox
    real_lstat = os.lstat

    def racing_lstat(path, *, dir_fd=None):
        st_ = real_lstat(path, dir_fd=dir_fd)
        if os.fspath(path) == "study" and not os.path.islink(root / "study"):
            os.rmdir(root / "study")
            os.symlink(outside, root / "study")
        return st_

    monkeypatch.setattr(paths.os, "lstat", racing_lstat)
    with pytest.raises(UserError):
        ensure_dir(root, "study", "trial_0001")
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------------------------
# check_inside: paths recorded elsewhere
# --------------------------------------------------------------------------------------------
def test_check_inside_accepts_paths_inside(sandbox):
    _, root, _ = sandbox
    ensure_dir(root, "study", "trial_0001", "checkpoint_000003")
    rroot = Path(os.path.realpath(root))
    assert check_inside(root, "study/trial_0001/checkpoint_000003") == rroot / "study" / "trial_0001" / "checkpoint_000003"
    assert check_inside(root, root / "study") == rroot / "study"
    assert check_inside(root, os.fsencode(root / "study")) == rroot / "study"
    assert check_inside(root, "study/../study/./trial_0001") == rroot / "study" / "trial_0001"
    assert check_inside(root, "") == rroot
    assert check_inside(root, "not/yet/there") == rroot / "not" / "yet" / "there"


@pytest.mark.parametrize(
    "recorded",
    ["..", "../outside", "study/../../outside", "/etc/passwd", "/", "a\x00b", "/tmp",
     "study/../../root-sibling"],
)
def test_check_inside_refuses_paths_outside(sandbox, recorded):
    _, root, _ = sandbox
    with pytest.raises(UserError) as e:
        check_inside(root, recorded)
    msg = str(e.value)
    assert "\n" not in msg and msg.isprintable()


def test_check_inside_refuses_sibling_with_common_prefix(tmp_path):
    root = tmp_path / "res"
    sibling = tmp_path / "res-evil"
    root.mkdir()
    sibling.mkdir()
    with pytest.raises(UserError):
        check_inside(root, sibling / "x")


def test_check_inside_refuses_non_paths(sandbox):
    _, root, _ = sandbox
    for bad in (None, 3, ["a"]):
        with pytest.raises(UserError):
            check_inside(root, bad)


def test_taking_the_sweep_lock_removes_only_the_temp_files_of_killed_writers(tmp_path):
    """Under ``SweepLock`` the temp files ``atomic_open`` and studydb name (``.<name>.<random>.tmp``) in the sweep dir
    and its phase dirs are removed; other hidden files, dirs, links (not followed) and nested files stay."""
    from sweeper.artifacts import SweepLock

    sweep = tmp_path / "s-0000000000"
    for d in ("sweep", "fanout", "sweep/tune"):
        (sweep / d).mkdir(parents=True)
    stale = [sweep / ".state.json.k2j4h5g6.tmp", sweep / "sweep" / ".trials.parquet.ab12_x9z.tmp",
             sweep / "sweep" / ".optuna_study.db.4321.tmp", sweep / "fanout" / ".metrics.parquet.q1w2e3r4.tmp"]
    outside = tmp_path / "victim.txt"
    outside.write_text("keep")
    kept = [sweep / "sweep" / ".keep.tmp", sweep / "sweep" / "trials.parquet", sweep / ".x.abcdefgh.tmp.bak",
            sweep / "sweep" / "tune" / ".trials.parquet.zz99yy88.tmp"]
    for f in stale + kept:
        f.write_text("x")
    (sweep / "sweep" / ".dir.abcdefgh.tmp").mkdir()
    (sweep / ".promotion.json.abcdefgh.tmp").symlink_to(outside)
    with SweepLock(sweep):
        assert not any(f.exists() for f in stale)
        assert all(f.exists() for f in kept) and (sweep / "sweep" / ".dir.abcdefgh.tmp").is_dir()
        assert (sweep / ".promotion.json.abcdefgh.tmp").is_symlink() and outside.read_text() == "keep"
