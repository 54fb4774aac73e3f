"""The GC probe of ``python -m bench upgrade`` (bench/gcprobe) and the stall maths that
sets collections aside (bench/stall.py ``covered``, ``longest_gap_clear_of``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import gcprobe, procs, stall

MS = 1_000_000


def test_covered_merges_overlapping_pauses_and_clips_them_to_the_gap() -> None:
    assert stall.covered(0, 10, [(2, 4), (3, 6), (8, 20)]) == 6
    assert stall.covered(0, 10, [(-5, 1), (9, 9)]) == 1
    assert stall.covered(0, 10, []) == 0


def test_longest_gap_clear_of_skips_the_gaps_a_collection_makes() -> None:
    done = [0, 1 * MS, 15 * MS, 16 * MS, 25 * MS, 26 * MS]  # gaps of 14 ms and 9 ms
    gc_pause = [(2 * MS, 12 * MS)]  # covers 10 of the 14 ms
    assert stall.longest_gap(done, 0, 26 * MS)[0] == 14 * MS
    assert stall.longest_gap_clear_of(done, 0, 26 * MS, gc_pause) == 9 * MS
    short = [(2 * MS, 5 * MS)]  # 3 of 14 ms: less than a third, the gap stays
    assert stall.longest_gap_clear_of(done, 0, 26 * MS, short) == 14 * MS


def _probe(tmp_path: Path, code: str, full_gc: str = "default") -> subprocess.CompletedProcess[str]:
    env = procs.child_env(gcprobe.env(tmp_path, "t", probe=True, full_gc=full_gc))
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_probe_logs_full_collections_per_process_also_after_a_fork(tmp_path: Path) -> None:
    # the child closes the parent's log fd and reuses its number (as the hot-restarted
    # mrpcd does): the probe must open its own file, not write into the reused number
    code = (
        "import gc, os, sys\n"
        "gc.collect()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    for fd in range(3, 64):\n"
        "        try: os.close(fd)\n"
        "        except OSError: pass\n"
        "    r, w = os.pipe()  # takes the lowest free numbers: the parent's log fd's\n"
        "    gc.collect()\n"
        "    sys.stderr.flush()\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print(os.getpid(), pid)\n"
    )
    r = _probe(tmp_path, code)
    parent, child = map(int, r.stdout.split())
    assert "Exception ignored" not in r.stderr, r.stderr
    ps = gcprobe.pauses(tmp_path)
    assert {p.pid for p in ps if p.generation == 2} == {parent, child}, ps
    assert all(p.role == "t" and p.ns > 0 for p in ps)


def test_probe_variants_set_the_collector(tmp_path: Path) -> None:
    out = _probe(tmp_path, "import gc; print(gc.get_threshold()[2])", full_gc="no-full")
    assert int(out.stdout) == 10**9
    code = "import gc; print(gc.get_freeze_count()); gc.collect(); print(gc.get_freeze_count())"
    before, after = map(int, _probe(tmp_path, code, full_gc="freeze").stdout.split())
    assert before == 0 and after > 1000  # the first full collection froze the start-up
