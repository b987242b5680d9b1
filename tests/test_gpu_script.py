"""bench/gpu.sh, the one command for a short-lived offline GPU machine, run end to end in its CPU
dry run as that machine would run it: without wandb, datasets or sweeps installed (an import of
any of them fails here), with the token cache shipped warm, and with an output folder from which
only 8 files, at most two folders deep, come back."""
import json
import re
import sys
import tarfile

import processes
from config import TrainConfig
from data import load_tokens
from tests.train_helpers import ROOT, offline_env, small_corpus

MISSING_ON_GPU_IMAGE = ("wandb", "datasets", "sweeps")


def without_packages(directory):
    """A PYTHONPATH folder whose wandb, datasets and sweeps raise ImportError on import."""
    directory.mkdir()
    for name in MISSING_ON_GPU_IMAGE:
        (directory / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the GPU image')\n")
    return directory


def test_the_import_blocker_blocks(tmp_path):
    """The negative control for the test below: with the folder on PYTHONPATH the imports fail."""
    blocker = without_packages(tmp_path / "blocked")
    for name in MISSING_ON_GPU_IMAGE:
        proc = processes.run([sys.executable, "-c", f"import {name}"], env=offline_env(PYTHONPATH=str(blocker)),
                             capture_output=True, text=True)
        assert proc.returncode != 0 and "not installed on the GPU image" in proc.stderr


def test_gpu_dry_run_end_to_end_without_wandb_or_datasets(tmp_path):
    corpus = small_corpus(tmp_path)
    cache = tmp_path / "cache"
    load_tokens(TrainConfig(dataset=str(corpus), cache_dir=str(cache)))  # warm, as shipped with `carry`
    train_args = (f"--attention=baseline --group=gpu --dataset={corpus} --cache_dir={cache} --d_model=32 "
                  "--n_layers=1 --n_heads=2 --d_ff=64 --n_experts=4 --top_k=2 --seq_len=32 --batch_size=4 "
                  "--steps=3 --eval_every=3 --eval_batches=2")
    out = tmp_path / "out"
    env = offline_env(PYTHONPATH=str(without_packages(tmp_path / "blocked")),
                      BENCH_FAIL="rope_small:reference,rope_small:check")  # one case of main, one of check
    proc = processes.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--dry_run",
                          "--variants", "baseline,rope_small", "--sections", "env,check,train,main,peak",
                          "--train_args", train_args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # cases failed (forced); everything else is there
    printed = proc.stdout
    assert len(printed) < 10_000

    # What comes back from the device machine: at most 8 files, two folders deep, plain names.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["check.txt", "main.txt", "results.tar.gz", "summary.txt", "train.txt"]
    assert len(files) <= 8
    for p in out.rglob("*"):
        assert len(p.relative_to(out).parts) <= 3 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
    assert (out / "summary.txt").read_text().strip() == printed.strip()

    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        main = json.load(tar.extractfile("gpu-results/main.json"))
        (record_name,) = [n for n in names if n.startswith("gpu-results/train/gpu/") and n.endswith(".json")]
        record = json.load(tar.extractfile(record_name))
    for section in ("env", "check", "train", "main", "peak"):
        assert f"gpu-results/{section}.txt" in names and f"gpu-results/{section}.log" in names

    # The forced failure is one failed case with its reason; the other cases were measured.
    by_case = {(r["variant"], r["impl"]): r for r in main["results"]}
    assert by_case["rope_small", "reference"]["status"] == "failed"
    assert "forced failure" in by_case["rope_small", "reference"]["error"]
    for key in [("baseline", "ours"), ("baseline", "reference"), ("rope_small", "ours")]:
        assert by_case[key]["status"] == "ok" and by_case[key]["ms_per_step"] > 0, key
    main_table = (out / "main.txt").read_text()
    assert "FAILED" in main_table and "rope_small reference seq=32: failed: RuntimeError: forced failure" in main_table

    check = (out / "check.txt").read_text()
    assert re.search(r"^baseline +yes ", check, re.M) and re.search(r"^rope_small +FAILED: .*forced failure", check, re.M)
    assert "1/2 variants match the reference on cpu" in check
    assert len(re.findall(r"^\w+ +(fp32|bf16) +yes ", check, re.M)) == 4  # the chunked loss, both dtypes

    # train.py ran to the end with wandb and datasets unimportable (WANDB_MODE=disabled, warm cache).
    assert record["status"] == "finished" and len(record["history"]) == 3
    train = (out / "train.txt").read_text()
    assert "status finished" in train and "tokens/s" in train
    assert f"{record['history'][-1]['val/loss']:.4f}" in train
    assert re.search(r"^  train +ok ", printed, re.M) and re.search(r"^  main +exit 1 .*1 failed", printed, re.M)


def test_bench_step_runs_the_rest_in_fresh_processes_after_a_device_error(monkeypatch, tmp_path):
    """A CUDA kernel error can leave the process's context unusable: the failed case is recorded
    with its reason, and the remaining cases run each in a fresh process (run_isolated)."""
    from bench import step

    calls = []

    def measured(case):
        return dict(case, status="ok", ms_per_step=10.0, tokens_per_s=6400.0, flops_per_token=1e6,
                    achieved_flops=6.4e9, peak_flops=1e12, peak_n=256)

    def in_process(case):
        calls.append(("in process", case["variant"]))
        if case["variant"] == "baseline":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        return measured(case)

    def fresh_process(case):
        calls.append(("fresh process", case["variant"]))
        return measured(case)

    monkeypatch.setattr(step, "run_case", in_process)
    monkeypatch.setattr(step, "run_isolated", fresh_process)
    monkeypatch.setattr(step, "device_usable", lambda device: False)  # as after that CUDA error
    code = step.main(["--preset", "tiny", "--device", "cpu", "--isolate", "no", "--impls", "ours",
                      "--variants", "baseline,rope_small,bias_only", "--out", str(tmp_path / "main")])
    assert code == 1
    assert calls == [("in process", "baseline"), ("fresh process", "rope_small"), ("fresh process", "bias_only")]
    results = json.loads((tmp_path / "main.json").read_text())["results"]
    assert [r["status"] for r in results] == ["failed", "ok", "ok"]
    assert results[0]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered more lines"


def test_sections_that_would_end_past_the_deadline_are_skipped(tmp_path):
    """With 30 s in all, env (budget 15 s, 10 s to be killed) runs; peak, a bench.step section that
    may take its budget + 20 s + 10 s, would end past the deadline, so it is recorded as skipped."""
    out = tmp_path / "out"
    proc = processes.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--dry_run", "--sections", "env,peak",
                          "--deadline", "30"], cwd=tmp_path, env=offline_env(), capture_output=True, text=True,
                         timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^  env +ok ", proc.stdout, re.M)
    assert re.search(r"^  peak +skipped .*out of time", proc.stdout, re.M)
    total = int(re.search(r"dry run\): (\d+) s in all", proc.stdout).group(1))
    assert total < 30
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.txt"]  # no headline section ran


def test_perf_md_names_the_token_cache_a_gpu_run_must_carry():
    """docs/PERF.md's device-tool invocation lists the token-cache files to `carry`; their names
    hash the data settings, so a change of those must change PERF.md too, or the GPU run misses
    its cache and needs `datasets`, which that machine lacks."""
    from data import token_cache_paths

    expected = [str(path.relative_to(ROOT)) for path in token_cache_paths(TrainConfig())]
    perf = (ROOT / "docs" / "PERF.md").read_text()
    assert f"`carry` | `{json.dumps(expected)}`" in perf, expected


def test_main_times_the_seed_variants_and_the_zoo_section_the_rest():
    """Every variant is timed on the GPU where time allows: main the seed's 13 (sweeps/fast.yaml),
    the last section the zoo (sweeps/zoo.yaml less the baseline main has); check covers all. The
    positive controls (family control: existing kinds with a knob at an extreme, for the CPU task
    sweeps) are not timed."""
    import argparse

    import yaml

    from attention import VARIANTS
    from bench.gpu import section_commands

    def listed(name):
        return yaml.safe_load((ROOT / "sweeps" / name).read_text())["parameters"]["attention"]["values"]

    args = argparse.Namespace(device="cuda", dry_run=False, variants="all", zoo_variants="zoo", train_args=None)
    commands = section_commands(args, ROOT)
    after = lambda cmd, flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    main, zoo = after(commands["main"], "--variants").split(","), after(commands["zoo"], "--variants").split(",")
    assert main == listed("fast.yaml") and len(main) == 13
    assert zoo == [v for v in listed("zoo.yaml") if v != "baseline"]
    assert sorted(main + zoo) == sorted(name for name, spec in VARIANTS.items() if spec.family != "control")
    assert after(commands["check"], "--variants") == "all"
