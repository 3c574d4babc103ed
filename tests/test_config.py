"""Every option declared once: flags, `--set`, presets and files reach the same fields."""

import re

import pytest
import yaml
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.config import BenchConfig, PretrainConfig, build_config, config_keys, parse_set
from stoptool.errors import UserError
from stoptool.options import choices, key_of
from stoptool.probe.config import ProbeConfig

runner = CliRunner()


def _printed(*args) -> dict:
    result = runner.invoke(app, ["pretrain", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_set_reaches_the_keys_that_have_no_other_way_than_a_file():
    cfg = _printed("--set", "ema=[0.99, 1.0]", "--set", "clip_grad=1.0", "--set", "min_keep=null",
                   "--set", "context_aspect=[0.8,1.25]", "--set", "const_after_epoch=3")
    assert cfg["ema"] == [0.99, 1.0] and cfg["clip_grad"] == 1.0 and cfg["min_keep"] is None
    assert cfg["context_aspect"] == [0.8, 1.25] and cfg["const_after_epoch"] == 3.0


def test_every_key_can_be_set_and_the_printed_config_round_trips(tmp_path):
    changed = {"arch": "vit_t2", "sigma": 0.5, "num_targets": 3, "crop_scale": [0.4, 1.0], "lr": 0.002,
               "ema": [0.99, 1.0], "seed": 7, "workers": 1, "compile": True, "mask_mode": "random",
               "dataset": "count", "shard_group": 2, "a_l1": 0.01}
    base = _printed()
    assert set(base) == set(config_keys())  # the printed config names every key
    values = {**base, **changed}
    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
             for k, v in values.items() if v is not None]
    args = [a for item in items for a in ("--set", item)]
    got = _printed(*args)
    for k, v in changed.items():
        assert got[k] == v, k
    # the printed YAML (sections as comments) is itself a config file that loads to the same
    text = runner.invoke(app, ["pretrain", *args, "--print-config"]).stdout
    assert "# model\n" in text and "# runtime\n" in text
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert build_config(str(path)).to_dict() == got


def test_set_applies_after_flags_and_file():
    assert _printed("--config", "stop-vitb16-in1k", "--lr", "0.5", "--set", "lr=0.25")["lr"] == 0.25


@pytest.mark.parametrize(
    "item, message",
    [
        ("lrr=1", "unknown config key 'lrr' (did you mean 'lr'?)"),
        ("epochs=2.5", "epochs takes an integer, got 2.5 (--epochs)"),
        ("hflip=2", "hflip must be between 0 and 1, got 2 (--hflip)"),
        ("ema=[0.9]", "ema takes two numbers"),
        ("ema=[1.0, 0.9]", "ema momentum must satisfy 0 <= start <= end <= 1"),
        ("noise_on=up", "noise_on must be one of masked, context, both, got 'up' (--noise-on)"),
        ("clip_grad=-1", "clip_grad must be >= 0, got -1 (--clip-grad)"),
        ("lr", "--set takes KEY=VALUE, got 'lr'"),
        ("lr=[1", "--set lr: '[1' is not a YAML value"),
    ],
)
def test_bad_set_values_exit_2_with_one_line_naming_the_key(tmp_path, item, message):
    result = runner.invoke(app, ["pretrain", "--set", item, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_set_values_are_yaml_typed_by_their_field():
    given = parse_set(["lr=1e-3", "steps=null", "ema=[0.99, 1]", "dataset=/data/x", "epochs=5.0"])
    assert given["steps"] is None and given["ema"] == [0.99, 1] and given["dataset"] == "/data/x"
    cfg = build_config(None, {**given, "steps": 3})
    assert (cfg.optim.lr, cfg.optim.ema, cfg.optim.epochs) == (1e-3, (0.99, 1.0), 5)
    assert isinstance(cfg.optim.epochs, int) and cfg.data.dataset == "/data/x"


def help_rows(text: str) -> dict[str, str]:
    """flag -> its row in a command's help (the row's wrapped lines joined)."""
    rows, flag = {}, None
    for line in text.splitlines():
        start = re.match(r"\s{2}(?:-\w, )?(--[\w-]+)", line)
        if start:
            flag = start.group(1)
            rows[flag] = line
        elif flag and line.startswith(" " * 6):
            rows[flag] += " " + line.strip()
    return rows


def test_every_option_is_a_flag_of_pretrain_with_its_choices_in_the_help():
    rows = help_rows(runner.invoke(app, ["pretrain", "--help"], terminal_width=200).stdout)
    for key, (_, f) in config_keys().items():
        flag = "--" + key.replace("_", "-")
        said = re.search(r"\(default: [^)]*\)", rows.get(flag, ""))
        assert said, flag
        for choice in choices(f) or ():
            assert choice in rows[flag], (flag, choice)


def test_sections_hold_each_key_once_and_the_masks_are_the_samplers_config():
    from stoptool.masks import MaskConfig

    cfg = PretrainConfig()
    assert isinstance(cfg.masks, MaskConfig)
    assert cfg.mask_config().grid == cfg.model.img_size // cfg.model.patch
    keys = [key_of(f) for _, f in config_keys().values()]
    assert len(keys) == len(set(keys)) == len(cfg.to_dict())


def test_bench_and_probe_configs_validate_themselves():
    with pytest.raises(UserError, match="steps must be positive, got 0") as err:
        BenchConfig(steps=0).validate()
    assert err.value.key == "steps"
    with pytest.raises(UserError, match="what must be one of train, extract, masks"):
        BenchConfig(what="all").validate()
    with pytest.raises(UserError, match=r"fraction must be in \(0, 1\], got 2"):
        ProbeConfig(random_init=True, arch="vit_t2", fraction=2).validate()
    with pytest.raises(UserError, match="precision must be one of auto, bf16, fp16, fp32"):
        ProbeConfig(random_init=True, arch="vit_t2", precision="int8").validate()
