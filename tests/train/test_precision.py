"""bf16 autocast trains like fp32: 100 steps of a tiny model end at close losses and probes (where
bf16 is fast: an AMX CPU or a GPU), and the first 10 steps agree on any machine."""

import json

import pytest
import torch

from stoptool.probe.run import ProbeConfig, run_probe
from stoptool.train.pretrain import pretrain
from stoptool.train.runtime import cpu_has_fast_bf16, gpu_has_bf16

LOSS_TOLERANCE = 0.02  # relative difference of the mean loss over the steps (measured over 200: 0.04 %)
PROBE_TOLERANCE = 0.03  # absolute difference of logistic-probe top-1 on digits (after 200 steps: 0.4)
SHORT_STEP_TOLERANCE = 0.01  # relative difference of any one of the first 10 steps (measured: 5e-5)


def _fast_bf16_here() -> bool:
    """Where the runs go (`--device auto`): a GPU with bf16 in hardware, or a CPU with AMX/AVX-512 BF16."""
    if torch.cuda.is_available():
        return gpu_has_bf16(torch.device("cuda"))
    return cpu_has_fast_bf16()


@pytest.mark.skipif(not _fast_bf16_here(), reason="no fast bf16 here")
def test_bf16_and_fp32_agree_after_100_steps(tiny_cfg, tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        cfg = tiny_cfg(
            arch="vit_t4", img_size=24, dataset="digits", batch_size=32, steps=100, epochs=10,
            lr=3e-4, warmup=1, log_every=20, save_every=100, precision=precision, out=str(out), device="auto",
        )
        pretrain(cfg)
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        probe = run_probe(ProbeConfig(
            ckpt=str(out / "latest.safetensors"), precision=precision, cache=False,
            out=str(tmp_path / f"{precision}.json"),
        ))
        mean_loss = sum(r["loss"] for r in rows) / len(rows)  # every row averages 20 steps
        results[precision] = (mean_loss, probe.rows[0]["top1"])
    (loss32, acc32), (loss16, acc16) = results["fp32"], results["bf16"]
    assert abs(loss16 - loss32) / loss32 < LOSS_TOLERANCE, results
    assert abs(acc16 - acc32) < PROBE_TOLERANCE, results


def test_bf16_and_fp32_agree_over_10_steps_on_any_machine(tiny_cfg, tmp_path):
    """The short version runs everywhere (bf16 is slow on a CPU without AMX, but the model is tiny)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        cfg = tiny_cfg(
            dataset="digits", steps=10, epochs=10, lr=3e-4, precision=precision, out=str(out), device="auto",
        )
        pretrain(cfg)
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 11))
        losses[precision] = [r["loss"] for r in rows]
    f32, b16 = losses["fp32"], losses["bf16"]
    worst = max(abs(a - b) / a for a, b in zip(f32, b16))
    mean = abs(sum(b16) - sum(f32)) / sum(f32)
    assert worst < SHORT_STEP_TOLERANCE and mean < LOSS_TOLERANCE, (worst, mean)
    assert f32 != b16  # the bf16 run really ran in bf16
