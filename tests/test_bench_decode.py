"""bench.decode at a tiny size: the rows' fields and their arithmetic (limit_ratio is the limit's
time over the measured step time; cache_bytes the model's count), its command line, and --generate
on a tiny training run's checkpoint (greedy tokens with the cache equal those without)."""
import json
import sys
import tarfile

import pytest

import model as model_module
import train
from bench import decode
from model import ModelConfig, kv_cache_bytes
from attention import VARIANTS
import processes
from tests.train_helpers import ROOT, offline_env, small_corpus, tiny_args

TINY_ROW = ["--preset", "tiny", "--device", "cpu", "--threads", "1", "--copy_mb", "8", "--warmup", "1",
            "--repeats", "2"]
FIELDS = {"variant", "context", "batch", "cache_bytes", "prefill_tokens_per_s", "decode_tokens_per_s", "limit_ratio",
          "peak_mem_bytes", "limit_decode_tokens_per_s", "limit_s_per_step", "bandwidth_bytes_per_s", "mla_decode"}


def test_rows_have_the_fields_and_a_consistent_limit(tmp_path):
    out = tmp_path / "decode.json"
    code = decode.main(TINY_ROW + ["--variants", "baseline,swa,mla_v3", "--contexts", "12,40", "--batch", "1,2",
                                   "--isolate", "no", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 3 * 2 * 2 + 2 * 2  # mla_v3 twice: absorbed and naive
    assert {r["mla_decode"] for r in rows if r["variant"] == "mla_v3"} == {"absorbed", "naive"}
    for r in rows:
        assert r["status"] == "ok" and FIELDS <= set(r), r
        size = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, n_experts=4, top_k=2, vocab_size=256, seq_len=32)
        assert r["cache_bytes"] == r["batch"] * kv_cache_bytes(ModelConfig(attention=VARIANTS[r["variant"]], **size),
                                                               r["context"], 4)  # fp32
        limit_s = (r["weight_bytes_per_step"] + r["cache_bytes_read_per_step"]) / r["bandwidth_bytes_per_s"]
        assert r["limit_s_per_step"] == pytest.approx(limit_s)
        assert r["limit_ratio"] == pytest.approx(limit_s / r["decode_s_per_step"])
        assert r["limit_ratio"] == pytest.approx(r["decode_tokens_per_s"] / r["limit_decode_tokens_per_s"])
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] / r["decode_s_per_step"])
        assert r["prompt_tokens"] == r["context"] - 3
    swa = {(r["context"], r["batch"]): r["cache_bytes"] for r in rows if r["variant"] == "swa"}
    assert swa[12, 1] == swa[40, 1]  # a window of 32 / 4 = 8 tokens, whatever the context
    baseline = {(r["context"], r["batch"]): r for r in rows if r["variant"] == "baseline"}
    # the weights read: every parameter (4 experts, 2 per token: at batch 1 half of them, at 2 all)
    assert baseline[12, 2]["weight_bytes_per_step"] > baseline[12, 1]["weight_bytes_per_step"]
    assert baseline[40, 1]["cache_bytes_read_per_step"] > baseline[12, 1]["cache_bytes_read_per_step"]


def test_the_command_line_isolated_and_bad_input(tmp_path):
    out = tmp_path / "d.json"
    proc = processes.run([sys.executable, "-m", "bench.decode", *TINY_ROW, "--variants", "gqa", "--contexts", "16",
                           "--out", str(out)], cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["status"] == "ok" and row["isolated"] and row["peak_mem_bytes"] > 0
    assert "limit tok/s" in proc.stdout and "gqa" in proc.stdout
    bad = processes.run([sys.executable, "-m", "bench.decode", "--contexts", "2,x"], cwd=ROOT, env=offline_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip() == (
        "error: --contexts=2,x: allowed: a comma list of positive integers")


def test_generate_from_a_tiny_runs_checkpoint(tmp_path, monkeypatch, capsys):
    """A run that crashed after its step-2 checkpoint keeps it; --generate loads it and decodes."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    original, calls = model_module.MoELM.forward, {"train": 0}

    def crash_at_step_4(self, ids, targets=None):
        calls["train"] += self.training
        if calls["train"] == 4:
            raise RuntimeError("crash after the checkpoint")
        return original(self, ids, targets)

    monkeypatch.setattr(model_module.MoELM, "forward", crash_at_step_4)
    corpus = small_corpus(tmp_path)
    train.main(tiny_args(tmp_path, corpus, attention="gptoss", steps=4, checkpoint_every=2, eval_every=2))
    monkeypatch.setattr(model_module.MoELM, "forward", original)
    (checkpoint,) = (tmp_path / "results").glob("*/checkpoints/gptoss-s0-*")
    capsys.readouterr()
    assert decode.main(["--generate", "--checkpoint", str(checkpoint), "--tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "gptoss (step 2)" in printed and "the same as without it" in printed
    tokens = json.loads(printed.split("with the cache: ")[1].split(" (")[0])
    assert len(tokens) == 5
    assert decode.main(["--generate", "--checkpoint", str(tmp_path)]) == 2


def test_gpu_sh_decode_section_in_its_dry_run(tmp_path):
    """bench/gpu.sh's decode section: bench.decode under the section's time budget, its rows counted
    in the status line and its table in the summary."""
    out = tmp_path / "out"
    proc = processes.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--dry_run", "--sections", "decode"],
                          cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("  decode ")]
    assert " ok " in line and "cases: 44 ok" in line  # 8 variants, 3 of them MLA twice, x 2 contexts x 2 batches
    assert "limit tok/s" in proc.stdout
    with tarfile.open(out / "results.tar.gz") as tar:
        rows = json.load(tar.extractfile("gpu-results/decode.json"))
    assert {(r["variant"], r["mla_decode"]) for r in rows if r["status"] == "ok"} >= {("mla_v3", "naive"),
                                                                                     ("baseline", "n/a")}
