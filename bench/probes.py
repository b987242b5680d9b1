"""What --probes=True costs: one train.py run at the smoke size (sweeps/smoke.yaml's values) with
probes off and on, alternated, each in a fresh process.

    python -m bench.probes                              # baseline, 3 repeats of each, offline W&B
    python -m bench.probes --attention lora_small --repeats 5 --out probes.json

Per run: the process's wall time, the record's time/total_s, the time spent in Run.evaluate (all
evaluations, timed in the child around the method), and the training step time (the record's
perf/step_time_ms: forward, backward and optimizer step, evaluation excluded) -- median over the
steps after the first. The probes run in evaluation only (probes.py), so the step time should not
move; evaluation and the run's wall time carry their cost. Off and on alternate (off first on even
repeats, on first on odd) so that a shared machine's load drifts over both alike.

Unlike bench.step this runs train.py itself, so it needs the training stack (datasets, and wandb
unless WANDB_MODE=disabled).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "PROBES_RESULT "
SMOKE = ROOT / "sweeps" / "smoke.yaml"


def smoke_values() -> dict:
    """The fixed `value:` parameters of sweeps/smoke.yaml: the smoke model and recipe."""
    import yaml

    parameters = yaml.safe_load(SMOKE.read_text())["parameters"]
    return {k: v["value"] for k, v in parameters.items() if isinstance(v, dict) and "value" in v}


def child(args) -> int:
    """One run in this process, with Run.evaluate timed; prints one tagged JSON line."""
    import train

    evaluations = []
    evaluate = train.Run.evaluate

    def timed(self, *a, **kw):
        begun = time.perf_counter()
        try:
            return evaluate(self, *a, **kw)
        finally:
            evaluations.append(time.perf_counter() - begun)

    train.Run.evaluate = timed
    values = {**smoke_values(), "attention": args.attention, "seed": args.seed, "probes": args.probes,
              "results_dir": args.results_dir, "group": "bench-probes"}
    code = train.main([f"--{k}={v}" for k, v in values.items()])
    if code != 0:
        return code
    rec = json.loads(next(Path(args.results_dir, "bench-probes").glob(f"{args.attention}-s{args.seed}*.json")).read_text())
    steps = [row["perf/step_time_ms"] for row in rec["history"]][1:]  # the first step warms up
    print(RESULT_TAG + json.dumps({
        "probes": args.probes, "total_s": rec["summary"]["time/total_s"],
        "startup_s": rec["summary"]["time/startup_s"], "eval_s": sum(evaluations), "evaluations": len(evaluations),
        "step_ms_median": statistics.median(steps), "step_ms_mean": statistics.mean(steps),
        "probe_keys": sum(k.startswith("probe/") for k in rec["summary"])}), flush=True)
    return 0


def one_run(args, probes: bool) -> dict:
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory(prefix="bench-probes-") as tmp:
        begun = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bench.probes", "--child", "--probes", str(probes),
                               "--attention", args.attention, "--seed", str(args.seed), "--results_dir", tmp],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - begun
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        sys.exit(f"error: the run with --probes={probes} failed (exit {proc.returncode}): "
                 f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return {**json.loads(lines[-1][len(RESULT_TAG):]), "wall_s": wall, "load1": os.getloadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", default="baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs with probes off, and as many on")
    parser.add_argument("--out", help="also write every run's numbers here as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probes", choices=["True", "False"], help=argparse.SUPPRESS)
    parser.add_argument("--results_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.probes = args.probes == "True"
        return child(args)
    runs = []
    for repeat in range(args.repeats):
        for probes in ((False, True) if repeat % 2 == 0 else (True, False)):
            runs.append(one_run(args, probes))
            r = runs[-1]
            print(f"probes={str(probes):5}  wall {r['wall_s']:6.2f} s  total {r['total_s']:6.2f} s  "
                  f"eval {r['eval_s']:5.2f} s ({r['evaluations']} evaluations)  step {r['step_ms_median']:6.1f} ms "
                  f"(median)  load {r['load1']:.1f}", flush=True)
    print(f"\n{args.attention}, smoke size ({SMOKE.name}), {args.repeats} runs each, medians:")
    print("| probes | run wall (s) | time/total_s | evaluation (s) | train step (ms, median) |")
    print("|---|---|---|---|---|")
    for probes in (False, True):
        arm = [r for r in runs if r["probes"] == probes]
        med = {k: statistics.median(r[k] for r in arm) for k in ("wall_s", "total_s", "eval_s", "step_ms_median")}
        print(f"| {'on' if probes else 'off'} | {med['wall_s']:.2f} | {med['total_s']:.2f} | {med['eval_s']:.2f} | "
              f"{med['step_ms_median']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"attention": args.attention, "smoke": smoke_values(), "runs": runs},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
