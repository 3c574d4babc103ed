"""The command line: a tiny default-like pretrain, presets, and one-line errors with exit 2."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stoptool.cli import app

runner = CliRunner(env={"COLUMNS": "400"})
TINY = [
    "--arch",
    "vit_n2",
    "--img-size",
    "16",
    "--pred-width",
    "48",
    "--pred-depth",
    "1",
    "--batch-size",
    "8",
    "--precision",
    "fp32",
    "--eval-every",  # the online k-NN is tested in tests/train/test_watch.py
    "0",
    "-q",
]


def test_tiny_pretrain_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", *TINY, "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"latest.safetensors", "config.yaml", "metrics.jsonl", "summary.json"} <= {
        p.name for p in out.iterdir()
    }
    assert str(out / "latest.safetensors") in result.output
    info = runner.invoke(app, ["info", str(out / "latest.safetensors")])
    assert info.exit_code == 0
    for text in ("vit_n2", "sigma", "0.25", "step", "encoder params"):
        assert text in info.output
    meta = json.loads(runner.invoke(app, ["info", str(out / "latest.safetensors"), "--json"]).stdout)
    assert [meta[k] for k in ("arch", "img_size", "patch", "sigma", "step")] == ["vit_n2", 16, 2, 0.25, 2]
    # the run directory itself stands for its latest checkpoint
    assert runner.invoke(app, ["info", str(out)]).output == info.output
    exported = runner.invoke(app, ["export", str(out), str(tmp_path / "enc.safetensors")])
    assert exported.exit_code == 0 and (tmp_path / "enc.safetensors").is_file()
    fig = runner.invoke(app, ["viz", "similarity", str(out), "--draws", "4"])
    assert fig.exit_code == 0, fig.output
    assert (out / "figures" / "similarity.png").is_file()
    empty = runner.invoke(app, ["info", str(tmp_path)])
    assert empty.exit_code == 2 and "is a directory without a latest.safetensors" in empty.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "vit_q16"], "unknown arch 'vit_q16'"),
        (["--img-size", "17"], "image size 17 is not a positive multiple of the patch size 2"),
        (["--img-size", "0"], "img_size must be positive, got 0 (--img-size)"),
        (["--min-keep", "-5"], "min_keep must be >= 0, got -5 (--min-keep)"),
        (["--sigma", "-0.1"], "sigma must be >= 0"),
        (["--target-scale", "0.1,1.5"], "target_scale must satisfy 0 < min <= max <= 1"),
        (["--context-scale", "0,0.5"], "context_scale must satisfy"),
        (["--dataset", "/no/such/dir"], "dataset path does not exist: /no/such/dir (--dataset)"),
        (["--dataset", "no-such-set"], "unknown dataset 'no-such-set': use digits, count, cifar10"),
        (["--config", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--noise-on", "everywhere"],
         "noise_on must be one of masked, context, both, got 'everywhere' (--noise-on)"),
        (["--sigma", "nan"], "sigma must be a finite number, got nan (--sigma)"),
        (["--lr", "inf"], "lr must be a finite number, got inf (--lr)"),
        (["--workers", "-2"], "workers must be >= 0, got -2 (--workers)"),
        (["--subset", "/no/such/list.txt"], "subset keeps images of an ImageFolder tree; digits has none"),
    ],
)
def test_bad_pretrain_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", *TINY, *args, "--steps", "1", "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output + result.stderr
    assert not out.exists()


def test_empty_image_folder_is_rejected(tmp_path):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    (tmp_path / "data" / "cls" / "notes.txt").write_text("no images here")
    result = runner.invoke(
        app, ["pretrain", *TINY, "--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "holds no images" in result.stderr
    assert not (tmp_path / "r").exists()


def test_image_folder_of_unreadable_files_is_rejected_before_the_run_starts(tmp_path):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    (tmp_path / "data" / "cls" / "x.png").write_bytes(b"not a png")
    args = ["pretrain", *TINY, "--batch-size", "1", "--dataset", str(tmp_path / "data"),
            "--out", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "no readable image in" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_outputs_under_a_regular_file_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--out", str(run)]).exit_code == 0
    ckpt = str(run / "latest.safetensors")
    commands = [
        ["pretrain", *TINY, "--steps", "1", "--out", str(blocker / "run")],
        ["probe", ckpt, "--no-cache", "--out", str(blocker / "p.json")],
        ["export", ckpt, "--to", "timm", str(blocker / "e.safetensors")],
        ["bench", "--what", "masks", "--batch-size", "2", "--steps", "1", "--repeats", "1",
         "--json", str(blocker / "b.json")],
    ]
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"'{blocker}' is not a directory" in result.stderr, args
        assert len(result.stderr.strip().splitlines()) == 1, args
    assert blocker.read_text() == "a file, not a directory"


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bench_threads_must_be_positive(threads):
    result = runner.invoke(app, ["bench", "--what", "masks", "--threads", threads])
    assert result.exit_code == 2 and f"threads must be positive, got {threads} (--threads)" in result.stderr


def test_info_shows_the_checked_sha256_or_says_there_is_none(tmp_path):
    from safetensors.torch import save_file

    from stoptool.io.checkpoint import Checkpoint, save_checkpoint, tensors_digest

    tensors = {"encoder.w": torch.ones(3)}
    meta = {"kind": "pretrain", "arch": "vit_t4", "img_size": 32}
    save_checkpoint(tmp_path / "new.safetensors", Checkpoint(meta, tensors))
    result = runner.invoke(app, ["info", str(tmp_path / "new.safetensors")])
    assert result.exit_code == 0, result.output
    assert f"{tensors_digest(tensors)} (checked)" in result.stdout
    as_json = json.loads(runner.invoke(app, ["info", str(tmp_path / "new.safetensors"), "--json"]).stdout)
    assert as_json["tensors_sha256"] == tensors_digest(tensors) and as_json["arch"] == "vit_t4"
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={"format": "stoptool", "meta": json.dumps(meta)})
    result = runner.invoke(app, ["info", str(tmp_path / "old.safetensors")])
    assert result.exit_code == 0 and "none (written before checkpoints carried one)" in result.stdout
    as_json = json.loads(runner.invoke(app, ["info", str(tmp_path / "old.safetensors"), "--json"]).stdout)
    assert as_json["tensors_sha256"] is None


def test_info_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_text("hello")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 2
    assert "not a readable stoptool checkpoint" in result.stderr


def test_preset_then_flags_override_and_print_config():
    result = runner.invoke(
        app, ["pretrain", "--config", "stop-vitl16-in1k", "--sigma", "0.1", "--print-config"]
    )
    assert result.exit_code == 0
    cfg = yaml.safe_load(result.stdout)
    assert cfg["arch"] == "vit_l16" and cfg["pred_depth"] == 12 and cfg["epochs"] == 600
    assert cfg["sigma"] == 0.1 and cfg["batch_size"] == 2048


def test_config_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("arch: vit_s8\nimg_size: 64\nsigma: 0\n")
    result = runner.invoke(app, ["pretrain", "--config", str(path), "--print-config"])
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["arch"], cfg["img_size"], cfg["sigma"]) == ("vit_s8", 64, 0)
    path.write_text("arhc: vit_s8\n")
    result = runner.invoke(app, ["pretrain", "--config", str(path), "--print-config"])
    assert result.exit_code == 2 and "unknown config key 'arhc' (did you mean 'arch'?)" in result.stderr


def test_config_file_numbers_as_yaml_writes_them(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string and `5.0` as a float: both are what the user meant.
    path = tmp_path / "mine.yaml"
    path.write_text("lr: 1e-3\nfinal_lr: 1E-6\nepochs: 5.0\nema: [0.99, 1]\nsigma: 0\n")
    result = runner.invoke(app, ["pretrain", "--config", str(path), "--print-config"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["lr"], cfg["final_lr"], cfg["epochs"], cfg["ema"]) == (0.001, 1e-6, 5, [0.99, 1.0])
    assert isinstance(cfg["epochs"], int)


@pytest.mark.parametrize(
    "line, message",
    [
        ("lr: fast", "lr takes a number, got 'fast'"),
        ("epochs: 2.5", "epochs takes an integer, got 2.5"),
        ("compile: maybe", "compile takes true or false, got 'maybe'"),
        ("noise_on: 16", "noise_on takes a string, got 16"),
        ("ema: [0.99, high]", "ema takes a number, got 'high'"),
        ("clip_grad: -1", "clip_grad must be >= 0"),  # a negative norm would flip the gradient
        ("const_after_epoch: -1", "const_after_epoch must be >= 0"),
        ("seed: -1", "seed must be between 0 and 4294967295, got -1 (--seed)"),
        ("lr: 1e-3\nepochs: 2\nlr: 2e-3", "key 'lr' appears twice"),
    ],
)
def test_config_file_value_of_the_wrong_type_exits_2(tmp_path, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text(line + "\n")
    args = ["pretrain", *TINY, "--config", str(path), "--steps", "1", "--out", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_yaml_merge_keys_still_work_beside_the_duplicate_key_check(tmp_path):
    from stoptool.config import build_config

    path = tmp_path / "merged.yaml"
    path.write_text("<<: {lr: 0.002, epochs: 3}\nepochs: 2\nema: &m [0.99, 1.0]\n")
    cfg = build_config(str(path))
    # the key beside the merge wins
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.ema) == (0.002, 2, (0.99, 1.0))
    path.write_text("[1, 2]: 3\n")
    result = runner.invoke(app, ["pretrain", "--config", str(path), "--print-config"])
    assert result.exit_code == 2 and "not valid YAML: found unhashable key" in result.stderr


def test_a_config_file_that_is_not_text_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe binary")
    result = runner.invoke(app, ["pretrain", "--config", str(path), "--print-config"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: config '{path}' is not a UTF-8 text file (YAML)"


@pytest.mark.parametrize("command", [["probe", "--random-init"], ["viz", "similarity", "x.safetensors"]])
def test_negative_seeds_are_refused_by_the_command_line(command):
    result = runner.invoke(app, [*command, "--seed", "-1"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: seed must be between 0 and 4294967295, got -1 (--seed)"


def test_random_masks_with_no_room_for_context_are_refused_before_any_output(tmp_path):
    out = tmp_path / "r"
    args = ["pretrain", *TINY, "--mask-mode", "random", "--num-targets", "8", "--steps", "1",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "random masking with 8 targets" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # the context block alone is too small for min-keep
        (["--context-scale", "0.02,0.05"], "context blocks of scale 0.02 on a 8×8 grid hold"),
        # six targets of 3×3 on a 4×4 grid leave a context no room: used to stop at a batch
        (["--img-size", "8", "--num-targets", "6", "--target-scale", "0.83,0.87",
          "--context-scale", "0.82,0.87"],
         "cannot place a context block of 3×3 that keeps more than 1 patches beside 6 targets of 3×3"),
    ],
)
def test_multiblock_masks_with_no_room_for_context_are_refused_before_any_output(tmp_path, flags, message):
    out = tmp_path / "r"
    result = runner.invoke(app, ["pretrain", *TINY, *flags, "--steps", "1", "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()

def test_pretrain_help_states_the_config_defaults():
    import re

    from stoptool.config import PretrainConfig

    text = runner.invoke(app, ["pretrain", "--help"]).stdout
    flat = " ".join(text.split())  # (the help wraps)
    cfg = PretrainConfig().to_dict()
    for name in ("sigma", "batch_size", "epochs", "lr", "start_lr", "final_lr", "wd", "final_wd", "ipe_scale",
                 "pred_pos", "noise_on", "cov", "a_l1", "mask_mode", "num_targets", "hflip", "blur", "gray",
                 "seed", "save_every", "log_every", "warmup"):
        flag = "--" + name.replace("_", "-")
        said = re.search(re.escape(flag) + r" <\w+> .*?\(default: ([^)]+)\)", flat)  # its row, not a mention
        assert said, flag
        assert said.group(1) == f"{cfg[name]:g}" if isinstance(cfg[name], float) \
            else said.group(1) == str(cfg[name]), (flag, said.group(1))

def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stoptool.cli", "pretrain", "--arch", "vit_z16", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown arch 'vit_z16'")
    assert not (tmp_path / "r").exists()



@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "--epochs", "2.5"], "error: Invalid value for '--epochs'"),
        (["pretrain", "--no-such-flag"], "error: No such option: --no-such-flag"),
        (["nosuch"], "error: No such command 'nosuch'"),
        (["viz", "masks", "--dpi", "x"], "error: Invalid value for '--dpi'"),
    ],
)
def test_mistyped_command_line_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "stoptool", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "--help" in lines[0] and not proc.stdout


def test_no_arguments_print_the_help_once():
    proc = subprocess.run([sys.executable, "-m", "stoptool", "viz"], capture_output=True, text=True)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert out.count("viz [OPTIONS] COMMAND") == 1 and "similarity" in out

@pytest.mark.parametrize(
    "preset",
    ["stop-vitb16-in1k", "stop-vitl16-in1k", "stop-vith16-in1k", "stop-vith14-in1k", "ijepa-vith14-in1k"],
)
def test_presets_match_the_paper(preset):
    from stoptool.config import build_config

    cfg = build_config(preset)
    expected = {
        "stop-vitb16-in1k": ("vit_b16", 600, 8e-4, 1e-4, 15, 6, 0.25),
        "stop-vitl16-in1k": ("vit_l16", 600, 8e-4, 1e-4, 15, 12, 0.25),
        "stop-vith16-in1k": ("vit_h16", 300, 1e-3, 1e-6, 40, 12, 0.2),
        "stop-vith14-in1k": ("vit_h14", 300, 1e-3, 1e-6, 40, 12, 0.2),
        "ijepa-vith14-in1k": ("vit_h14", 300, 1e-3, 1e-6, 40, 12, 0.0),
    }[preset]
    flat = cfg.to_dict()
    got = tuple(flat[k] for k in ("arch", "epochs", "lr", "final_lr", "warmup", "pred_depth", "sigma"))
    assert got == expected
    assert flat["batch_size"] == 2048 and flat["img_size"] == 224 and flat["start_lr"] == 2e-4
    assert (flat["wd"], flat["final_wd"]) == (0.04, 0.4)
    stop = preset.startswith("stop-")  # the StoP release adds flips, blur and grey to I-JEPA's crops
    assert (flat["hflip"], flat["blur"], flat["gray"]) == ((0.5, 0.5, 0.2) if stop else (0.0, 0.0, 0.0))
    assert flat["const_after_epoch"] == (250 if preset.startswith("stop-vith") else None)


def test_the_smaller_rung_is_the_vitb16_recipe_at_a_tenth_of_its_epochs():
    from stoptool.config import build_config

    rung = build_config("stop-vits16-in1k-ep60").to_dict()
    paper = build_config("stop-vitb16-in1k").to_dict()
    assert (rung["arch"], rung["epochs"], rung["warmup"]) == ("vit_s16", 60, 1.5)
    assert (paper["epochs"], paper["warmup"]) == (600, 15)
    assert {k: v for k, v in rung.items() if k not in ("arch", "epochs", "warmup")} == {
        k: v for k, v in paper.items() if k not in ("arch", "epochs", "warmup")}


def test_size_defaults_follow_the_arch():
    sizes = {}
    for arch in ("vit_b16", "vit_t4", "vit_s8", "vit_l16", "vit_h14"):
        result = runner.invoke(app, ["pretrain", "--arch", arch, "--print-config"])
        cfg = yaml.safe_load(result.stdout)
        sizes[arch] = (cfg["img_size"], cfg["pred_depth"], cfg["pred_width"])
    assert sizes == {
        "vit_b16": (224, 6, 384), "vit_t4": (32, 2, 96), "vit_s8": (224, 6, 384),
        "vit_l16": (224, 12, 384), "vit_h14": (224, 12, 384),
    }


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_gets_a_note(tmp_path, monkeypatch, fast):
    import stoptool.train.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    args = ["pretrain", *TINY, "--precision", "bf16", "--device", "cpu", "--steps", "1",
            "--out", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "bf16 runs many times slower" in line]
    assert len(notes) == (0 if fast else 1)
    assert all(line.startswith("note:") and line.endswith("--precision auto picks fp32") for line in notes)
    assert (tmp_path / "r" / "latest.safetensors").exists()


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_command_and_option_has_help():
    commands = dict(_commands(app))
    assert {"pretrain", "probe", "info", "import", "export", "bench"} <= {c[0] for c in commands}
    assert {("viz", "similarity"), ("viz", "heatmap"), ("viz", "masks"), ("viz", "curves")} <= set(commands)
    for path, cmd in commands.items():
        assert (cmd.help or "").strip(), path
        for param in cmd.params:
            assert (getattr(param, "help", None) or "").strip(), (path, param.name)
        shown = runner.invoke(app, [*path, "--help"])
        assert shown.exit_code == 0 and "Usage" in shown.stdout, path


def test_sigterm_saves_latest_and_exits_143(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stoptool", "pretrain", *TINY, "--dataset", "digits", "--epochs", "50",
         "--log-every", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard only
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    from stoptool.io.checkpoint import read_meta

    step = read_meta(out / "latest.safetensors")["step"]
    total = 50 * (1347 // 8)  # 50 epochs of the digits' 1,347 training images in batches of 8
    assert (f"interrupted at step {step} of {total}: checkpoint saved to {out / 'latest.safetensors'}; "
            f"resume with the same command, or: stoptool pretrain --config {out / 'config.yaml'}") in err
    logged = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert step >= 1 and logged[-1] == step  # the step in flight finished and was saved


def test_no_resume_starts_over_in_the_same_directory(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--log-every", "1", "--out", str(out)]
    assert runner.invoke(app, [*args, "--steps", "3"]).exit_code == 0
    again = runner.invoke(app, [*args, "--steps", "1", "--no-resume"])
    assert again.exit_code == 0, again.output
    meta = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert meta["step"] == 1
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_viz_that_needs_a_predictor_refuses_an_encoder_only_file(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--out", str(out)]).exit_code == 0
    enc = tmp_path / "enc.safetensors"
    assert runner.invoke(app, ["export", str(out), str(enc)]).exit_code == 0
    for cmd in ("similarity", "heatmap"):
        result = runner.invoke(app, ["viz", cmd, str(enc), "--out", str(tmp_path / f"{cmd}.png")])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "predictor" in result.stderr
        assert not (tmp_path / f"{cmd}.png").exists() and not (tmp_path / f"{cmd}.json").exists()


def test_progress_bar_shows_step_epoch_loss_lr_speed_and_eta(tmp_path):
    out = tmp_path / "run"
    args = [a for a in TINY if a != "-q"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["pretrain", *args, "--steps", "3", "--log-every", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()][-1]
    bar = result.stderr.strip().splitlines()[-1]
    for text in ("pretrain", "3/3", f"epoch {last['epoch']:.1f}", f"loss {last['loss']:.4f}",
                 f"lr {last['lr']:.2e}", "img/s", "ETA"):
        assert text in bar, (text, bar)


def test_without_quiet_a_refused_pretrain_prints_its_error_alone(tmp_path):
    """The progress bar appears with the first step, so an error found before it is the only
    line on stderr (no blank line left by a bar that had started)."""
    proc = subprocess.run([sys.executable, "-m", "stoptool", "pretrain", "--device", "foo",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown device 'foo': use auto, cpu, cuda or cuda:N\n"


def test_an_empty_out_is_refused_not_taken_for_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--out", ""])
    assert result.exit_code == 2 and "out is empty" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_pretrain_table_counts_the_unreadable_images_it_skipped(image_folder, tmp_path):
    out = tmp_path / "r"
    result = runner.invoke(app, ["pretrain", *TINY, "--dataset", str(image_folder), "--steps", "2",
                                 "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    skipped = json.loads((out / "summary.json").read_text())["skipped_images"]
    assert skipped > 0  # the fixture holds a broken file
    assert f"skipped images │ {skipped} (unreadable)" in result.stdout


def test_names_too_long_for_the_filesystem_are_one_line_errors_and_long_legal_ones_work(tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--out", str(run)]).exit_code == 0
    ckpt = str(run / "latest.safetensors")
    too_long = str(tmp_path / ("n" * 300))
    commands = [
        ["info", too_long + ".safetensors"],
        ["probe", too_long + ".safetensors"],
        ["viz", "curves", too_long],
        ["export", ckpt, "--to", "timm", too_long + ".safetensors"],
        ["viz", "masks", "--out", too_long + ".png"],
        ["pretrain", *TINY, "--steps", "1", "--out", too_long],
    ]
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "too long" in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # 245 characters fit (the limit is 255 bytes); so must the temporary file written beside
    long_ok = tmp_path / "out" / ("e" * 233 + ".safetensors")
    assert runner.invoke(app, ["export", ckpt, "--to", "timm", str(long_ok)]).exit_code == 0
    written = sorted(p.name for p in long_ok.parent.iterdir())
    assert written == sorted([long_ok.name, long_ok.stem + ".export.json"])
    # a figure whose own name fits but whose JSON beside it (.json for .png) would not
    figure = tmp_path / "fig" / ("f" * 251 + ".png")
    result = runner.invoke(app, ["viz", "masks", "--out", str(figure)])
    assert result.exit_code == 2 and "is longer than 255 bytes" in result.stderr, result.output
    emoji = tmp_path / "fig" / ("\U0001F9E9" * 60 + ".png")  # 244 bytes; its temporary too must fit
    assert runner.invoke(app, ["viz", "masks", "--out", str(emoji)]).exit_code == 0
    assert sorted(p.name for p in emoji.parent.iterdir()) == sorted([emoji.name, emoji.stem + ".json"])
