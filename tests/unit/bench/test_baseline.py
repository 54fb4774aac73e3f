"""The baseline checkout of ``--baseline REV`` and its import checks (bench/baseline.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import baseline, procs
from bench.systems import Unavailable
from bench.systems.mrpc_systems import Mrpc


def test_checkout_extracts_the_revision_with_this_bench_and_removes_it() -> None:
    with baseline.checkout("HEAD") as co:
        root = co.root
        assert len(co.commit) == 40 and co.rev == "HEAD"
        for pkg in baseline.MRPC_PACKAGES:
            assert (root / pkg / "__init__.py").is_file()
        # the harness is the working tree's (uncommitted changes included), results are not
        assert (root / "bench" / "baseline.py").read_bytes() == Path(baseline.__file__).read_bytes()
        assert not (root / "bench" / "results").exists()
        assert (root / "schemas" / "echo.proto").is_file()
    assert not root.exists() and not root.parent.exists()


def test_checkout_is_removed_when_the_run_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), baseline.checkout("HEAD") as co:
        root = co.root
        raise RuntimeError("boom")
    assert not root.parent.exists()


def test_a_bad_revision_is_named_in_the_error() -> None:
    with pytest.raises(baseline.BaselineError, match="'no-such-rev-xyz' names no commit"):
        baseline.resolve("no-such-rev-xyz")
    with pytest.raises(baseline.BaselineError, match="is not a git revision"):
        baseline.resolve("--all")


def test_processes_in_the_checkout_import_its_code_not_the_working_tree() -> None:
    with baseline.checkout("HEAD") as co:
        theirs = baseline.check_tree(co.root)["files"]
        mine = baseline.check_tree(procs.REPO_ROOT)["files"]
        print("baseline:", theirs, "\nworking tree:", mine)
        for mod in baseline.CHECKED_MODULES:
            assert Path(theirs[mod]).is_relative_to(co.root)
            assert Path(mine[mod]).is_relative_to(procs.REPO_ROOT)
        # the check tells the two apart
        assert baseline.wrong_code(theirs, co.root) is None
        problem = baseline.wrong_code(mine, co.root)
        assert problem is not None and f"mrpcd from {procs.REPO_ROOT}" in problem


def test_a_tree_missing_a_package_fails_the_check_with_the_module_named() -> None:
    """Without ``engines`` in the tree, the venv's editable install of the working tree
    would supply it: the probe must catch that, not run mixed code."""
    with baseline.checkout("HEAD") as co:
        shutil.rmtree(co.root / "engines")
        with pytest.raises(Unavailable, match=r"imported engines from \S+ instead of"):
            baseline.check_tree(co.root)


def test_wrong_code_needs_the_app_to_report_its_library() -> None:
    root = Path("/nonexistent/tree")
    assert "did not report where it imported libmrpc" in str(baseline.wrong_code({}, root))
    assert baseline.wrong_code({"libmrpc": "/nonexistent/tree/libmrpc/__init__.py"}, root) is None


def test_twin_runs_the_checkout_and_skips_experiments() -> None:
    co = baseline.Checkout("HEAD~1", "a" * 40, Path("/nonexistent/tree"))
    twin = baseline.twin(Mrpc, co)
    assert twin.name == "mrpc@HEAD~1"
    assert twin.code_root == co.root and Mrpc.code_root == procs.REPO_ROOT
    assert twin.experiments == () and not twin.has_bind_time
    assert issubclass(twin, Mrpc)
    with pytest.raises(Unavailable, match="/nonexistent/tree"):
        twin().check()  # the probe cannot even start in a missing tree
