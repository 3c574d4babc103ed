"""Every command's options, as --help lists them, against the record taken before the commands
were declared from their option dataclasses (tests/fixtures/help-options.json: flags, kind and
the default as help states it, for each command that existed then)."""

import json
import re
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from stoptool.cli import app

RECORD = Path(__file__).parent / "fixtures" / "help-options.json"
# Defaults changed on purpose since the record, each with its reason.
CHANGED = {
    # a checkpoint is probed on its own labelled data set, digits only where it has none
    ("probe", "--dataset"): "the data set the checkpoint was trained on, where it has labelled train and val "
                            "splits; else digits",
}

# Options added since the record, each with its reason: (command, flags) -> default.
ADDED = {
    # the compiled step replayed as CUDA graphs (experimental, for a GPU)
    ("bench", "--cuda-graphs --no-cuda-graphs"): "off",
    ("pretrain", "--cuda-graphs --no-cuda-graphs"): "off",
}


def _default(param) -> str:
    """The default as help states it: its "(default: ...)" text, else the parameter's own value
    written the way options.default_help writes one."""
    found = re.search(r"\(default: (.*)\)$", " ".join((getattr(param, "help", None) or "").split()))
    if found:
        return found.group(1)
    value = param.default
    if value is None or value == [] or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def listed_options(group=None, prefix: tuple = ()) -> dict[str, dict[str, dict]]:
    """command -> "flags" -> {kind, default} for every command of the app."""
    group = group or typer.main.get_command(app)
    out = {}
    for name, command in sorted(group.commands.items()):
        path = prefix + (name,)
        if hasattr(command, "commands"):
            out.update(listed_options(command, path))
            continue
        out[" ".join(path)] = {" ".join(sorted(p.opts + p.secondary_opts)): {"kind": p.param_type_name,
                                                                               "default": _default(p)}
                               for p in command.params}
    return out


def test_every_command_lists_the_options_and_defaults_it_had():
    before, now = json.loads(RECORD.read_text()), listed_options()
    for (command, flags), default in CHANGED.items():
        assert before[command][flags]["default"] != default  # (a change the record does not hold yet)
        before[command][flags]["default"] = default
    for (command, flags), default in ADDED.items():
        assert flags not in before[command]
        before[command][flags] = {"kind": "option", "default": default}
    assert set(before) <= set(now)
    for command, options in before.items():
        assert now[command] == options, command


def test_every_help_fits_80_columns_in_one_style():
    """At 80 columns: nothing cut (no ellipsis, no truncated command summary), no <bool>
    placeholder, defaults stated one way only ("(default: X)"), usage arguments in capitals."""
    runner = CliRunner(env={"COLUMNS": "80"})
    commands = [c.split() for c in listed_options()] + [[], ["viz"]]
    for command in commands:
        text = runner.invoke(app, [*command, "--help"]).output
        where = " ".join(command) or "stoptool"
        assert text.startswith("Usage: "), where
        assert all(len(line) <= 80 for line in text.splitlines()), where
        assert "…" not in text and "<bool>" not in text and "[default:" not in text, where
        assert not any(line.rstrip().endswith("...") and line.startswith("  ") and not line.startswith("   ")
                       for line in text.splitlines()), where  # (a command summary cut short)
        usage = text.splitlines()[0]
        assert re.sub(r"[^a-z]", "", usage.split("[OPTIONS]", 1)[-1]) == "", usage  # CKPT, [IMAGE], ...
