"""`stoptool bench` reports consistent figures for each kind of measurement."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from stoptool.bench import matmul_size
from stoptool.cli import app
from stoptool.flops import encoder_flops, train_step_flops

runner = CliRunner(env={"COLUMNS": "200"})
TINY = [
    "--arch",
    "vit_n2",
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
    expected = train_step_flops("vit_n2", 16, 48, 1, r["context_tokens"], r["target_tokens"], 4).total
    assert r["flops_per_image"] == expected
    assert r["achieved_flops"] == pytest.approx(expected * r["img_per_s"])
    assert r["share_of_matmul_rate"] == pytest.approx(r["achieved_flops"] / r["matmul_flops"])
    assert "share of matmul rate" in result.output
    assert r["attn"] == "sdpa"  # fp32 on the CPU keeps the fused kernel


def test_train_bench_defaults_to_what_pretrain_runs(tmp_path):
    """Without size or predictor flags the bench times the step `stoptool pretrain` would run."""
    out = tmp_path / "d.json"
    # vit_t2: 192 wide, so that the predictor's default width (96) is not the encoder's
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
    assert json.loads(out.read_text())["flops_per_image"] == encoder_flops("vit_n2", 16)


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


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    from stoptool.data.prepare import prepare

    out = tmp_path_factory.mktemp("bench-shards") / "set"
    prepare(image_folder, out, short_side=16, workers=0)
    return out


@pytest.mark.parametrize("source", ["digits", "folder", "shards"])
def test_data_bench_times_the_input_pipeline_alone(source, image_folder, shards, tmp_path):
    dataset = {"digits": "digits", "folder": str(image_folder), "shards": str(shards)}[source]
    out = tmp_path / "d.json"
    result = runner.invoke(app, ["bench", "--what", "data", "--dataset", dataset, "--arch", "vit_n2",
                                 "--img-size", "16", "--batch-size", "4", "--steps", "2", "--repeats", "2",
                                 "--hflip", "0.5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["what"] == "data" and r["img_per_s"] > 0 and r["img_per_s_per_core"] == r["img_per_s"]
    assert (r["batch_size"], r["workers"], r["cores"], r["hflip"], r["decode"]) == (4, 0, 1, 0.5, "cpu")
    # the folder's broken file is listed (and skipped when met); prepare left it out
    assert r["dataset_images"] == {"digits": 1347, "folder": 25, "shards": 24}[source]
    assert "img/s per core" in result.output and "bilinear" in result.output


def test_data_bench_refuses_gpu_decoding_without_a_gpu():
    result = runner.invoke(app, ["bench", "--what", "data", "--decode", "gpu", "--device", "cpu"])
    assert result.exit_code == 2
    want = "error: decode=gpu decodes JPEGs on a CUDA device, and this run's device is cpu: use decode=cpu"
    assert result.stderr.strip().splitlines() == [f"{want} (--decode)"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--what", "all"],
         "what must be one of train, extract, masks, data, finetune, host, got 'all' (--what)"),
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


TINY_PRESET = {
    "arch": "vit_n2", "img_size": 16, "pred_width": 48, "pred_depth": 1, "num_targets": 2,
    "dataset": "digits", "epochs": 2, "batch_size": 8, "precision": "fp32", "device": "cpu",
}
TIMING = ["--steps", "1", "--warmup", "1", "--repeats", "2"]


def test_bench_config_times_the_presets_step_and_projects_its_schedule(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY_PRESET))
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", "--config", str(preset), *TIMING, "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    # the preset's model, masks and batch were timed
    timed = (r["arch"], r["img_size"], r["pred_width"], r["pred_depth"], r["batch_size"])
    assert timed == ("vit_n2", 16, 48, 1, 8)
    counted = train_step_flops("vit_n2", 16, 48, 1, r["context_tokens"], r["target_tokens"], 2)  # 2 targets
    assert r["flops_per_image"] == counted.total
    # digits: 1,347 training images, 168 steps of 8 an epoch, 2 epochs
    assert (r["dataset_images"], r["iterations_per_epoch"], r["schedule_steps"]) == (1347, 168, 336)
    assert r["images_seen"] == 336 * 8
    # one device runs the preset's whole batch a step: the schedule takes its steps at the measured step time
    assert r["projected_hours"] == pytest.approx(336 * r["ms_per_step"] / 3.6e6)
    assert r["projected_hours_devices"] == r["projected_hours"] and r["devices"] == 1
    assert "digits: 1,347 training images" in result.stdout
    assert "2 epochs × 168 steps = 336 steps of 8 images (2,688 images)" in result.stdout
    assert "linear-scaling" not in result.stdout


def test_bench_config_on_devices_times_one_devices_share_and_scales_linearly(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY_PRESET))
    out = tmp_path / "b.json"
    args = ["bench", "--config", str(preset), "--devices", "2", *TIMING, "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["batch_size"] == 4 and r["devices"] == 2  # half the preset's batch of 8 on each device
    assert r["projected_hours"] == pytest.approx(336 * 8 / r["img_per_s"] / 3600)
    assert r["projected_hours_devices"] == pytest.approx(r["projected_hours"] / 2)
    assert "projected, 2 devices" in result.stdout and "a linear-scaling estimate" in result.stdout
    # flags given override the preset
    args = ["bench", "--config", str(preset), "--batch-size", "2", "--arch", "vit_t4", "--img-size", "32",
            *TIMING, "--json", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    r = json.loads(out.read_text())
    assert (r["arch"], r["batch_size"], r["pred_depth"]) == ("vit_t4", 2, 1)


def test_the_paper_presets_schedule_is_epochs_times_imagenet_steps():
    from stoptool.bench import projection
    from stoptool.config import bench_config

    cfg = bench_config({"config": "stop-vitb16-in1k", "devices": 16})
    timed = (cfg.arch, cfg.img_size, cfg.batch_size, cfg.pred_depth, cfg.sigma)
    assert timed == ("vit_b16", 224, 128, 6, 0.25)
    p = projection(cfg, img_per_s=1000.0)
    # ImageNet-1k train: 1,281,167 images, 625 steps of 2,048 an epoch, 600 epochs
    assert (p["dataset_images"], p["iterations_per_epoch"], p["schedule_steps"]) == (1_281_167, 625, 375_000)
    assert p["images_seen"] == 768_000_000
    assert p["projected_hours"] == pytest.approx(768e6 / 1000 / 3600)
    assert p["projected_hours_devices"] == pytest.approx(p["projected_hours"] / 16)
    vith = projection(bench_config({"config": "ijepa-vith14-in1k"}), img_per_s=1000.0)
    assert vith["schedule_steps"] == 300 * 625


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "stop-vitb16-in1k", "--devices", "3"],
         "the preset's batch of 2048 does not split evenly over 3 devices: give one device's batch with "
         "--batch-size (--devices)"),
        (["--devices", "2"], "devices splits a preset's batch: give a preset with --config too (--devices)"),
        (["--config", "no-such-preset"], "unknown preset 'no-such-preset'"),
    ],
)
def test_bad_bench_config_input(args, message):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_with_new_masks_every_step_counts_the_shapes_met_and_splits_micro_batches(tmp_path):
    """--vary-masks draws masks as a run does: 1 + warm-up + steps × repeats batches here, whose
    distinct shapes the bench counts; --accum-steps times the batch in micro-batches."""
    import torch

    from stoptool.config import config_from_dict
    from stoptool.masks import MaskSampler

    out = tmp_path / "v.json"
    args = ["bench", *TINY, "--steps", "3", "--vary-masks", "--accum-steps", "2", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    cfg = config_from_dict({"arch": "vit_n2", "img_size": 16, "pred_width": 48, "pred_depth": 1})
    sampler, gen = MaskSampler(cfg.mask_config()), torch.Generator().manual_seed(0)
    draws = [sampler(4, gen) for _ in range(1 + 1 + 3 * 2)]
    assert r["mask_shapes"] == len({(c.shape[1], t.shape[2]) for c, t in draws}) >= 2
    assert r["accum_steps"] == 2 and "compiled_graphs" not in r
    assert re.search(rf"mask shapes met\s+│ {r['mask_shapes']} ", result.output)
    assert re.search(r"micro-batches\s+│ 2 of 2 ", result.output)
    refused = runner.invoke(app, ["bench", *TINY, "--accum-steps", "3"])
    assert refused.exit_code == 2
    assert "batch_size 4 does not split into accum_steps 3 equal micro-batches" in refused.output
