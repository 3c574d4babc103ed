"""Command-line flags generated from declared options (`stoptool.options`).

`with_options(fields)` adds one typer option per field to a command: the flag is the key with
dashes, the help is the field's help and default, every flag defaults to None (so that a flag
left out never overrides a config file), and the command receives the flags that were given
as `overrides`, keyed and typed like a config file's values.
"""

import functools
import inspect
from dataclasses import Field

import typer

from stoptool.options import base_type, coerce, default_help, is_list, is_pair, key_of


def flag_of(f: Field) -> str:
    return "--" + key_of(f).replace("_", "-")


def _parameter(f: Field, panel: str | None) -> inspect.Parameter:
    meta, kind = f.metadata, base_type(f)
    required = meta.get("required")
    help_text = meta["help"] if required else f"{meta['help']} (default: {default_help(f)})"
    if is_list(f):
        annotation = list[str]
    elif kind in (int, float, bool):
        annotation = kind
    else:  # strings, choices, MIN,MAX pairs
        annotation = str
    if meta.get("argument"):
        metavar = meta.get("metavar") or key_of(f).upper()  # one style: CKPT, OUT, DIR, ...
        info = typer.Argument(... if required else None, help=help_text, metavar=metavar, show_default=False)
    else:
        flag = flag_of(f)
        decls = meta.get("flags") or ((f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,))
        metavar = meta.get("metavar") or ("MIN,MAX" if is_pair(f) else None)
        info = typer.Option(None, *decls, help=help_text, metavar=metavar, rich_help_panel=panel)
    return inspect.Parameter(key_of(f), inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=annotation if required else annotation | None)


def with_options(option_fields: list[Field], panels: dict[str, str] | None = None):
    """Decorate a command `fn(..., overrides: dict)` with a flag for each of `option_fields`,
    shown in --help under the panel that `panels` gives its key (if any)."""
    by_key = {key_of(f): f for f in option_fields}

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for name, p in sig.parameters.items() if name != "overrides"]
        generated = [_parameter(f, (panels or {}).get(key_of(f))) for f in option_fields]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            given = {k: kwargs.pop(k) for k in by_key if k in kwargs}
            # (a repeatable option given no value comes as an empty list: not given)
            overrides = {k: coerce(by_key[k], v) for k, v in given.items() if v is not None and v != []}
            return fn(*args, overrides=overrides, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


# The options every command with a config file shares (pretrain, finetune): where the config
# comes from, single keys over it, and a look at the result.


def config_option(example: str) -> typer.models.OptionInfo:
    return typer.Option(None, "--config", metavar="PRESET|FILE",
                        help=f"A preset name (e.g. {example}) or a YAML file; flags and --set override it. "
                        "(default: none)")


def set_option(command: str, examples: str) -> typer.models.OptionInfo:
    """--set KEY=VALUE; `examples` shows two, e.g. "--set ema=[0.99,1.0] --set min_keep=null"."""
    return typer.Option([], "--set", metavar="KEY=VALUE", show_default=False,
                        help=f"Set any config key (repeatable); VALUE is YAML, e.g. {examples}. Keys: see "
                        f"{command} --print-config. (default: none)")


def print_config_option() -> typer.models.OptionInfo:
    return typer.Option(False, "--print-config", show_default=False,
                        help="Print the resolved config as YAML and exit. (default: off)")


def quiet_option(what: str = "No progress bar.") -> typer.models.OptionInfo:
    return typer.Option(False, "--quiet", "-q", show_default=False, help=f"{what} (default: off)")
