"""The documentation describes this repository, only this repository, and links resolve.

What runs the README's snippets against real daemons: tests/integration/test_readme.py.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.markdown_blocks import ROOT, anchors, blocks, doc_files, links, prose

README = ROOT / "README.md"
RUN_LANGS = {"python", "bash", "sh", "shell"}


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{target}: points outside the repository")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: {dest.name} has no heading with anchor #{fragment}")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_readme_links_the_design_documents() -> None:
    targets = set(links(README))
    for doc in ("docs/ARCHITECTURE.md", "docs/LAYOUT.md", "docs/SECURITY.md", "bench/README.md"):
        assert doc in targets, f"README.md does not link {doc}"


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the repository's files")
    files = [ROOT / name for name in out.decode().split("\0") if name]
    return [f for f in files if f.suffix in {".md", ".py", ".yaml", ".toml", ".proto", ""}]


def test_nothing_points_outside_the_repository_at_team_notes() -> None:
    team = "shared"  # the team's notes folder is not part of the product
    bad = re.compile(rf"(\.\./{team}\b|/work/{team}\b)")
    hits = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in _tracked_text_files()
        if f.is_file()
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if bad.search(line)
    ]
    assert not hits, "files that point at the team's notes folder:\n" + "\n".join(hits)


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_tracker_references(doc: Path) -> None:
    text = prose(doc)
    hits = re.findall(r"(?i)\b(issue\s*#?\s*\d+|the \w+ issue)\b", text)
    assert not hits, f"{doc.relative_to(ROOT)} refers to a tracker the reader cannot see: {hits}"


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    first = blocks(README)[0]
    before = [ln for ln in lines[: first.line - 1] if ln.strip()]
    assert len(before) == 1 and before[0].startswith("# "), f"before the commands: {before}"
    commands = first.code.strip().splitlines()
    assert first.lang == "bash" and first.marker is None and len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install -q -e . && ")
    assert main_job.endswith(".venv/bin/python examples/echo.py")
    assert (ROOT / "examples" / "echo.py").is_file()
    assert tests == (
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
        ".venv/bin/python -m pytest"
    )
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "pytest" in " ".join(extras["test"])


def test_every_readme_block_is_run_or_says_why_not() -> None:
    found = blocks(README)
    assert len(found) >= 6, f"only {len(found)} code blocks found in README.md"
    for b in found:
        if b.marker == "not-run":
            assert len(b.marker_arg) > 10, f"{b.where()}: not-run needs a reason"
        elif b.marker == "run-as":
            assert b.marker_arg == "server" and b.lang == "python", b.where()
        else:
            assert b.lang in RUN_LANGS | {"proto", "text"}, f"{b.where()}: language {b.lang!r}"


def test_readme_proto_block_is_the_schema_file_it_names() -> None:
    protos = [b for b in blocks(README) if b.lang == "proto"]
    assert protos, "README.md shows no schema"
    text = README.read_text().splitlines()
    for b in protos:
        intro = next(ln for ln in reversed(text[: b.line - 1]) if ln.strip())
        named = re.findall(r"`(schemas/[\w.]+\.proto)`", intro)
        assert named, f"{b.where()}: the text before a proto block names its file in schemas/"
        want = re.sub(r"\s+", "", (ROOT / named[0]).read_text())
        assert re.sub(r"\s+", "", b.code) == want, f"{b.where()} differs from {named[0]}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_leftover_placeholders(doc: Path) -> None:
    hits = [
        f"{n}: {line.strip()}"
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if re.search(r"\b(PLACEHOLDER|TODO|FIXME|XXX)\b", line)
    ]
    assert not hits, f"{doc.relative_to(ROOT)} has unfinished text:\n" + "\n".join(hits)


def _defines(source: str, name: str) -> bool:
    """``name`` is a function, class, module-level name or instance attribute in ``source``."""
    pattern = rf"^\s*(?:async\s+def|def|class)\s+{name}\b|^\s*{name}\s*[:=]|self\.{name}\s*[:=]"
    return re.search(pattern, source, re.MULTILINE) is not None


def test_architecture_names_code_that_exists() -> None:
    """Every `package/file.py:Name.attr` in docs/ARCHITECTURE.md is a real file defining Name and attr."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    refs = re.findall(r"(?<![\w/])((?:mrpcd|libmrpc|engines)/[\w/]+\.py)(?::([\w.]+))?", text)
    assert len(refs) > 40, f"only {len(refs)} file references found"
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file():
            missing.append(f"{path}: no such file")
            continue
        source = file.read_text()
        for part in name.split(".") if name else ():
            if not _defines(source, part):
                missing.append(f"{path}:{name}: {part} is not defined there")
    classes: dict[str, str] = {}  # class name -> source of the file defining it
    for pkg in ("mrpcd", "libmrpc", "engines"):
        for file in (ROOT / pkg).rglob("*.py"):
            source = file.read_text()
            for cls in re.findall(r"^class\s+(\w+)", source, re.MULTILINE):
                classes[cls] = source
    spans = re.findall(r"`([^`\n]+)`", prose(ROOT / "docs" / "ARCHITECTURE.md"))
    methods = {m for s in spans for m in re.findall(r"(?<![\w.])([A-Z]\w+)\.(\w+)", s)}
    assert len(methods) > 40, f"only {len(methods)} Class.attr references found"
    for cls, attr in sorted(methods):
        if cls in classes and not _defines(classes[cls], attr):
            missing.append(f"{cls}.{attr}: {attr} is not defined in the file of class {cls}")
        elif cls not in classes:
            missing.append(f"{cls}.{attr}: no class {cls} in mrpcd, libmrpc or engines")
    assert not missing, "docs/ARCHITECTURE.md names code that does not exist:\n" + "\n".join(
        sorted(set(missing))
    )


def test_readme_layout_names_every_folder_and_real_modules() -> None:
    layout = next(b for b in blocks(README) if b.lang == "text" and "mrpcd/" in b.code)
    folders = re.findall(r"^(\w+)/", layout.code, re.MULTILINE)
    tops = {
        p.relative_to(ROOT).parts[0]
        for p in _tracked_text_files()
        if len(p.relative_to(ROOT).parts) > 1 and not p.relative_to(ROOT).parts[0].startswith(".")
    }
    assert tops and not tops - set(folders), (
        f"folders missing from the layout: {tops - set(folders)}"
    )
    missing, folder = [], ""
    for line in layout.code.splitlines():
        top = re.match(r"^(\w+)/", line)
        if top:
            folder = top.group(1)
            continue
        for name in re.findall(r"\b([\w*]+)\.py\b", line.strip().split("  ")[0]):
            if not list((ROOT / folder).glob(f"**/{name}.py")):  # also in a subfolder
                missing.append(f"{folder}/{name}.py")
    assert not missing, f"README layout names modules that do not exist: {missing}"
