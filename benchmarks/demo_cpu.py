"""How busy the machine's CPUs are while each step of a pipeline runs (the training steps above
all): runs `difforge run FILE` as a user does, samples the whole machine's CPU use every second,
and reports, per step, the mean number of busy cores between its start and end lines.

    python benchmarks/demo_cpu.py pipelines/quickstart.yaml

Writes benchmarks/results/demo_cpu.json. Other work on the machine counts too: run it alone.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
START = re.compile(r"^(\d\d:\d\d:\d\d) step (\S+) \(([\w.]+)\): running")
FUSED = re.compile(r"^(\d\d:\d\d:\d\d) steps (.+): running in one pass")
END = re.compile(r"^(\d\d:\d\d:\d\d) step (\S+) \(([\w.]+)\): (?!running)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_cpu.json"))
    args = parser.parse_args()

    samples: list[tuple[float, float]] = []  # (time, busy cores)
    done = threading.Event()

    def sample() -> None:
        psutil.cpu_percent(None)
        while not done.wait(1.0):
            samples.append((time.time(), psutil.cpu_percent(None) / 100 * psutil.cpu_count()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    cmd = [str(Path(sys.executable).parent / "difforge"), "run", args.file]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    done.set()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"difforge run failed:\n{proc.stdout}\n{proc.stderr}")
    day = datetime.fromtimestamp(t0).date()

    def at(clock: str) -> float:
        return datetime.combine(day, datetime.strptime(clock, "%H:%M:%S").time()).timestamp()

    spans: dict[str, dict] = {}
    for line in proc.stderr.splitlines() + proc.stdout.splitlines():
        if m := START.match(line):
            spans[m[2]] = {"op": m[3], "start": at(m[1])}
        elif m := FUSED.match(line):
            for part in m[2].split(", "):
                step, op = part.split(" (")
                spans[step] = {"op": op.rstrip(")"), "start": at(m[1])}
        elif (m := END.match(line)) and m[2] in spans:
            spans[m[2]]["end"] = at(m[1])
    report = {}
    for step, s in spans.items():
        inside = [c for t, c in samples if s["start"] <= t <= s.get("end", s["start"])]
        if inside:
            report[step] = {
                "op": s["op"],
                "seconds": s["end"] - s["start"],
                "mean_busy_cores": round(sum(inside) / len(inside), 2),
            }
    result = {
        "command": " ".join(["python", "benchmarks/demo_cpu.py", args.file]),
        "cores": psutil.cpu_count(),
        "steps": report,
        "wall_s": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    # what the user saw (off a terminal: no progress bars), for the README's console figures
    console = proc.stderr + proc.stdout
    Path(args.out).with_suffix(".console.txt").write_text(console)
    print(f"console: {len(console.splitlines())} lines")
    for step, r in report.items():
        print(f"{step:12} {r['op']:22} {r['seconds']:7.0f}s  {r['mean_busy_cores']:.2f} cores busy")
    print(proc.stdout.rsplit("\n\n", 2)[-2] if "\n\n" in proc.stdout else "")


if __name__ == "__main__":
    main()
