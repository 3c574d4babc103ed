"""`stoptool bench` reports consistent figures for each kind of measurement."""

import json

import pytest
from typer.testing import CliRunner

from stoptool.bench import matmul_size
from stoptool.cli import app
from stoptool.flops import encoder_flops, train_step_flops

runner = CliRunner(env={"COLUMNS": "200"})
TINY = [
    "--arch",
    "vit_t2",
    "--img-size",
    "16",
    "--batch-size",
    "4",
    "--pred-width",
    "48",
    "--pred-depth",
    "1",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--precision",
    "fp32",
]


def test_train_bench_json(tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", *TINY, "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"]
    expected = train_step_flops("vit_t2", 16, 48, 1, r["context_tokens"], r["target_tokens"], 4).total
    assert r["flops_per_image"] == expected
    assert r["achieved_flops"] == pytest.approx(expected * r["img_per_s"])
    assert r["share_of_matmul_rate"] == pytest.approx(r["achieved_flops"] / r["matmul_flops"])
    assert "share of matmul rate" in result.output
    assert r["attn"] == "sdpa"  # fp32 on the CPU keeps the fused kernel


def test_train_bench_defaults_to_what_pretrain_runs(tmp_path):
    """Without size or predictor flags the bench times the step `stoptool pretrain` would run."""
    out = tmp_path / "d.json"
    args = ["bench", "--arch", "vit_t2", "--batch-size", "2", "--steps", "1", "--warmup", "0"]
    result = runner.invoke(app, [*args, "--repeats", "1", "--precision", "fp32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert (r["img_size"], r["pred_depth"], r["pred_width"]) == (16, 2, 96)  # 8 patches a side, 2 × 96
    assert "2 × 96" in result.output


def test_extract_bench_counts_a_forward(tmp_path):
    out = tmp_path / "e.json"
    result = runner.invoke(app, ["bench", *TINY, "--what", "extract", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["flops_per_image"] == encoder_flops("vit_t2", 16)


def test_mask_bench(tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "--what",
            "masks",
            "--arch",
            "vit_b16",
            "--batch-size",
            "32",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["grid"] == 14 and r["batches_per_s"] > 0 and r["threads"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--what", "everything"], "what must be one of train, extract, masks, got 'everything' (--what)"),
        (["--attn", "flash"], "attn must be one of auto, sdpa, math, got 'flash' (--attn)"),
        (["--arch", "vit_b16", "--img-size", "100"], "not a positive multiple of the patch size"),
        (["--steps", "0"], "steps must be positive, got 0 (--steps)"),
    ],
)
def test_bad_bench_input(args, message):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize(
    "seconds_at_256, largest, side",
    [
        (3e-4, 2048, 2048),  # a CPU's fp32 at about 100 GFLOP/s: 0.15 s a 2048² product
        (5.6e-2, 2048, 512),  # bf16 without bf16 instructions, 0.6 GFLOP/s: 2048² would take 28 s
        (2.0, 2048, 256),  # slower still: never below 256²
        (1e-5, 8192, 8192),  # a GPU: launch-bound at 256², 8192² at full rate
    ],
)
def test_the_matmul_rate_is_measured_on_products_of_at_most_a_second(seconds_at_256, largest, side):
    assert matmul_size(seconds_at_256, largest) == side
