"""`stoptool finetune`'s options and presets: the published recipes, their values by encoder
size, and the command line over them."""

import pytest
import yaml
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.errors import UserError
from stoptool.finetune.config import build_finetune_config


def preset(name: str, arch: str, **flags):
    return build_finetune_config(name, {"random_init": True, "arch": arch, **flags}).for_arch(arch).validate()


# MAE's FINETUNE.md, ViT-B / ViT-L / ViT-H, and what all three share
MAE = {"vit_b16": dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
       "vit_l16": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
       "vit_h14": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3)}
MAE_ALL = dict(batch_size=1024, wd=0.05, mixup=0.8, cutmix=1.0, reprob=0.25, remode="pixel", smoothing=0.1,
               warmup=5.0, min_lr=1e-6, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
               eval_crop_pct=0.875, crop_scale=(0.08, 1.0), hflip=0.5)


@pytest.mark.parametrize("arch", list(MAE))
def test_the_full_data_preset_is_maes_recipe_for_the_encoders_size(arch):
    cfg = preset("finetune-in1k", arch)
    for key, want in {**MAE[arch], **MAE_ALL}.items():
        assert getattr(cfg, key) == want, key
    assert cfg.lr is None and cfg.peak_lr() == pytest.approx(MAE[arch]["blr"] * 1024 / 256)  # per 256 images
    assert cfg.by_size == {}  # spent: the config written to the run reads back the same


def test_the_one_percent_preset_is_ijepas_low_shot_recipe():
    large, huge = preset("finetune-in1k-1pct", "vit_l16"), preset("finetune-in1k-1pct", "vit_h14")
    for cfg in (large, huge):
        assert (cfg.epochs, cfg.batch_size, cfg.layer_decay, cfg.smoothing) == (50, 512, 0.75, 0.1)
        assert cfg.auto_augment == "rand-m9-mstd0.5-inc1"
        assert (cfg.mixup, cfg.cutmix, cfg.reprob, cfg.drop_path) == (0, 0, 0, 0)  # none of them
        assert cfg.peak_lr() == 3e-5  # absolute: the batch does not scale it
    assert (large.wd, huge.wd) == (0.05, 0.4)
    assert preset("finetune-in1k-1pct", "vit_l16", batch_size=256).peak_lr() == 3e-5


def test_the_command_line_wins_over_the_values_by_size():
    assert preset("finetune-in1k", "vit_b16", drop_path=0.5).drop_path == 0.5
    assert preset("finetune-in1k", "vit_b16", epochs=3).epochs == 3
    assert preset("finetune-in1k", "vit_b16").drop_path == 0.1


def test_print_config_resolves_for_the_encoder_and_reads_back(tmp_path):
    runner = CliRunner()
    args = ["finetune", "--random-init", "--arch", "vit_b16", "--config", "finetune-in1k", "--set", "seed=3"]
    result = runner.invoke(app, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert (printed["drop_path"], printed["epochs"], printed["seed"], printed["by_size"]) == (0.1, 100, 3, {})
    assert "# optimization" in result.stdout and "# data and augmentation" in result.stdout
    (tmp_path / "again.yaml").write_text(result.stdout)
    again = runner.invoke(app, ["finetune", "--config", str(tmp_path / "again.yaml"), "--print-config"])
    assert again.exit_code == 0, again.output
    assert yaml.safe_load(again.stdout) == printed


@pytest.mark.parametrize("args, message", [
    (["--set", "lrr=1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
    (["--layer-decay", "1.5"], "layer_decay must be <= 1, got 1.5 (--layer-decay)"),
    (["--set", "by_size={x: {lr: 1}}"], "by_size is keyed by size letter"),
    (["--set", "by_size={b: {lrr: 1}}"], "by_size.b: unknown config key 'lrr'"),
    (["--fraction", "0"], "fraction must be in (0, 1], got 0.0 (--fraction)"),
    (["--config", "finetune-in1k-2pct"], "unknown finetune preset 'finetune-in1k-2pct': choose one of"),
    (["--arch", "vit_t4"], "arch and init are for random_init"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["finetune", str(tmp_path / "x.safetensors"), *args, "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_or_random_init_is_needed():
    with pytest.raises(UserError, match="give a checkpoint to fine-tune"):
        build_finetune_config(None, {})
    with pytest.raises(UserError, match="random_init needs an arch"):
        build_finetune_config(None, {"random_init": True})
