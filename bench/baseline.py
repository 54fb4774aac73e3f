"""A baseline revision of mrpc, run side by side with the working tree (``--baseline REV``).

:func:`checkout` extracts ``git archive REV`` into a temporary directory (removed at
the end; the shared repository's worktree list is left alone) and puts the working
tree's ``bench/`` in it, so both sides run the same harness and only mrpc's code
(``mrpcd``, ``libmrpc``, ``engines``) differs. :func:`twin` makes ``NAME@REV`` of a
system: every process it starts has the checkout as its cwd and first on
``PYTHONPATH`` (``procs.spawn(root=...)``), ahead of the venv's editable install of
the working tree, and its daemons have their own prefixes, so their schema caches
(``PREFIX/cache``) are never shared with the working tree's.

That the path order works is checked, not assumed: :func:`check_tree` runs
``python -m bench.baseline`` the way the daemons are started (same interpreter, cwd,
environment, ``-m`` resolution) and fails the system when a module came from
elsewhere; client and server apps report their own module files (:func:`loaded_code`)
and the runner checks those too (:func:`wrong_code`).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.systems import System, Unavailable

log = logging.getLogger(__name__)

MRPC_PACKAGES = ("mrpcd", "libmrpc", "engines")
CHECKED_MODULES = (*MRPC_PACKAGES, "bench")
API = ("connect", "load_proto", "Server")
PROBE_TIMEOUT_S = 60.0
GIT_TIMEOUT_S = 120.0


class BaselineError(RuntimeError):
    """The baseline revision cannot be checked out; the message says why."""


@dataclass(frozen=True)
class Checkout:
    rev: str  # as the user gave it: HEAD~1, a hash, a branch
    commit: str  # the full hash it resolved to
    root: Path  # the extracted tree (with the working tree's bench/)

    @property
    def label(self) -> str:
        """``REV`` as used in system names (``mrpc@REV``)."""
        return self.rev

    def to_json(self) -> dict[str, Any]:
        return {"rev": self.rev, "commit": self.commit, "root": str(self.root)}


def resolve(rev: str, repo: Path = procs.REPO_ROOT) -> str:
    """The full commit hash of ``rev`` in ``repo``; BaselineError if it names none."""
    if not rev or rev.startswith("-"):
        raise BaselineError(f"--baseline {rev!r} is not a git revision: give e.g. HEAD~1 or a hash")
    out = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise BaselineError(
            f"--baseline {rev!r} names no commit in {repo}: give a revision `git rev-parse` "
            "knows (HEAD~1, a hash, a branch)"
        )
    return out.stdout.strip()


@contextmanager
def checkout(
    rev: str, repo: Path = procs.REPO_ROOT, parent: Path | None = None
) -> Iterator[Checkout]:
    """Extract ``rev`` into a temporary directory for the duration of the block."""
    commit = resolve(rev, repo)
    tmp = Path(tempfile.mkdtemp(prefix="mrpc-bench-baseline-", dir=parent))
    try:
        root = tmp / "tree"
        root.mkdir()
        _extract(commit, repo, root)
        missing = [p for p in MRPC_PACKAGES if not (root / p / "__init__.py").is_file()]
        if missing:
            raise BaselineError(
                f"--baseline {rev} ({commit[:12]}) has no {', '.join(missing)} package: "
                "pick a revision of mrpc that has the daemon and the library"
            )
        # the harness is the working tree's on both sides: only mrpc's code differs
        shutil.rmtree(root / "bench", ignore_errors=True)
        shutil.copytree(
            repo / "bench",
            root / "bench",
            ignore=shutil.ignore_patterns("results", "latest", "__pycache__"),
        )
        echo = root / "schemas" / "echo.proto"
        if not echo.is_file():
            echo.parent.mkdir(exist_ok=True)
            shutil.copy2(repo / "schemas" / "echo.proto", echo)
        log.info("baseline %s (%s) in %s", rev, commit[:12], root)
        yield Checkout(rev, commit, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(commit: str, repo: Path, dest: Path) -> None:
    with subprocess.Popen(
        ["git", "archive", "--format=tar", commit],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as git:
        assert git.stdout is not None
        try:
            with tarfile.open(fileobj=git.stdout, mode="r|") as tar:
                tar.extractall(dest, filter="data")
        except tarfile.TarError as exc:
            git.kill()
            raise BaselineError(f"git archive {commit[:12]} gave no readable tar: {exc}") from exc
        err = git.stderr.read().decode(errors="replace") if git.stderr else ""
        if git.wait(timeout=GIT_TIMEOUT_S) != 0:
            raise BaselineError(f"git archive {commit[:12]} failed: {err.strip()[-500:]}")


# ----------------------------------------------------------------------------- import checks


def loaded_code(modules: tuple[str, ...] = CHECKED_MODULES) -> dict[str, str]:
    """``{module: __file__}`` of the checked modules this process has imported."""
    out: dict[str, str] = {}
    for name in modules:
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__file__", None) or "")
    return out


def wrong_code(
    files: Mapping[str, str], root: Path, require: tuple[str, ...] = ("libmrpc",)
) -> str | None:
    """Why a process that should run the code in ``root`` does not, or None if it does."""
    missing = [m for m in require if m not in files]
    if missing:
        return f"did not report where it imported {', '.join(missing)} from"
    base = root.resolve()
    wrong = [
        f"{name} from {path or '<no file>'}"
        for name, path in files.items()
        if not path or not Path(path).resolve().is_relative_to(base)
    ]
    if wrong:
        return f"imported {'; '.join(wrong)} instead of the code tree {base}"
    return None


def probe(root: Path) -> dict[str, Any]:
    """Run ``python -m bench.baseline`` as a daemon would run in ``root``; its report."""
    try:
        out = subprocess.run(
            procs.python_argv("bench.baseline"),
            cwd=root,
            env=procs.child_env(root=root),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"cannot run python in {root}: {exc}") from exc
    if out.returncode != 0:
        raise Unavailable(
            f"importing mrpc from {root} failed ({out.returncode}): "
            f"{out.stderr.strip()[-600:] or out.stdout.strip()[-600:]}"
        )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def check_tree(root: Path) -> dict[str, Any]:
    """Probe ``root``; Unavailable when its processes would run other code or lack the API."""
    report = probe(root)
    problem = wrong_code(report.get("files", {}), root, require=CHECKED_MODULES)
    if problem:
        raise Unavailable(f"a process started in {root} {problem} (check PYTHONPATH)")
    if report.get("missing_api"):
        raise Unavailable(f"libmrpc in {root} has no {', '.join(report['missing_api'])}")
    if not report.get("mrpcd_main"):
        raise Unavailable(f"mrpcd in {root} has no __main__ (python -m mrpcd run)")
    return report


def _probe_main() -> None:
    import importlib.util

    import engines  # noqa: F401 - imported to report where from
    import libmrpc
    import mrpcd  # noqa: F401

    report = {
        "files": loaded_code(),
        "sys_path_0": sys.path[0],
        "missing_api": [n for n in API if not hasattr(libmrpc, n)],
        "mrpcd_main": importlib.util.find_spec("mrpcd.__main__") is not None,
    }
    print(json.dumps(report))


# ----------------------------------------------------------------------------- twins


def twin(cls: type[System], co: Checkout) -> type[System]:
    """``NAME@REV``: system ``cls`` with every process running the code of ``co``."""

    def check(self: System) -> None:
        self.import_check = check_tree(co.root)  # type: ignore[attr-defined]

    attrs: dict[str, Any] = {
        "name": f"{cls.name}@{co.label}",
        "summary": f"{cls.summary} — the code of {co.rev} ({co.commit[:12]})",
        "code_root": co.root,
        "experiments": (),
        "has_bind_time": False,
        "check": check,
    }
    return type(f"{cls.__name__}Baseline", (cls,), attrs)


if __name__ == "__main__":
    _probe_main()
