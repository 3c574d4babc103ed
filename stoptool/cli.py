"""The `stoptool` command line: parse, validate, call, report. No method code lives here."""

import datetime
import errno
import functools
import json
import sys
import time
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stoptool.cliopts import config_option, print_config_option, quiet_option, set_option, with_options
from stoptool.config import BenchConfig, option_fields, option_panels
from stoptool.errors import UserError
from stoptool.finetune.config import cli_fields as finetune_fields
from stoptool.finetune.config import panels as finetune_panels
from stoptool.io.paths import check_writable
from stoptool.masks import MaskConfig
from stoptool.options import build, declared
from stoptool.probe.config import ProbeConfig

app = typer.Typer(
    help="StoP (stochastic positional embeddings) on I-JEPA: pretrain ViTs, probe them, draw the paper's figures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
SEED_MAX = 2**32 - 1  # what numpy and scikit-learn take


def user_errors(fn):
    """Turn a UserError into one line on stderr and its exit code (2: bad input; 1: a write the
    machine refused, see `errors.WriteFailed`); likewise a path given on the command line that is
    too long for the filesystem, wherever it is first looked at (exit 2)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            flag = f" (--{err.key.replace('_', '-')})" if err.key else ""  # the key's spelling as a flag
            # the message is text, not markup: a `[hf]` in it must print as written
            err_console.print(f"[bold red]error:[/] {escape(str(err))}{flag}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:
            if err.errno != errno.ENAMETOOLONG:
                raise
            name = f"'{err.filename}'" if err.filename else "(a path given)"
            err_console.print(f"error: file name too long: {name}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _note(text: str) -> None:
    """One line on stderr, never wrapped or read as markup; the engine's alarms come as
    "warning: ..." and keep that word."""
    line = text if text.startswith("warning: ") else f"note: {text}"
    err_console.print(line, highlight=False, markup=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if not value:
        return
    from stoptool.train.runtime import environment

    env = environment()
    sys.stdout.write(
        f"stoptool {env['stoptool']}\ntorch {env['torch']}\ntimm {env['timm']}\n"
        f"device (--device auto): {env['auto_device']}\n"
        f"fast bf16: {'yes' if env['fast_bf16'] else 'no'} ({env['fast_bf16_why']})\n"
    )
    raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print stoptool's, torch's and timm's versions, the device --device auto "
                                 "picks here and whether bf16 is fast on it, then exit."),
):
    pass


def print_table(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths must stay whole, never cut with an ellipsis
    for k, v in rows.items():
        table.add_row(str(k), str(v))
    console.print(table)


@app.command()
@user_errors
@with_options(option_fields(), option_panels())
def pretrain(
    config: str | None = config_option("stop-vitb16-in1k"),
    set_: list[str] = set_option("pretrain", "--set ema=[0.99,1.0] --set min_keep=null"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from the run directory's latest checkpoint."),
    print_config: bool = print_config_option(),
    quiet: bool = quiet_option(),
    overrides: dict | None = None,
):
    """Pretrain an encoder with I-JEPA + StoP (σ > 0) or plain I-JEPA (σ = 0).

    Every option below is also a config key (--set KEY=VALUE, presets, YAML files). Under torchrun (torchrun --nproc-per-node N -m stoptool pretrain ...) the processes train one model data-parallel (--fsdp for models too large for a replica per GPU); --batch-size is the global batch.
    """
    from stoptool.config import build_config, parse_set

    cfg = build_config(config, {**overrides, **parse_set(set_)})
    if print_config:
        sys.stdout.write(cfg.to_yaml())
        return
    from stoptool.train.distributed import world_from_env
    from stoptool.train.fit import Interrupted
    from stoptool.train.pretrain import pretrain as run_pretrain

    main_rank = world_from_env().main  # under torchrun, rank 0 alone reports
    if main_rank:
        _note_slow_bf16(cfg.runtime.precision, cfg.runtime.device)
    with _ProgressBar(quiet or not main_rank) as bar:
        try:
            notify = _note if main_rank else None
            result = run_pretrain(cfg, resume=resume, progress=bar.update, notify=notify)
        except Interrupted as stop:
            bar.stop()
            if main_rank:
                err_console.print(f"interrupted: checkpoint saved to {stop.checkpoint}", highlight=False, markup=False,
                                  soft_wrap=True)
            raise typer.Exit(128 + stop.signum) from None
    if not main_rank:
        return
    if result.already_done:
        _say(f"run in {result.run_dir} is already complete at step {result.step}; "
             "use --steps/--epochs to go further or --no-resume to start over")
        return
    print_table("pretrain", result.rows())


def _say(text: str) -> None:
    """A line on stdout, printed as written (no markup, no wrapping)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _speed(row: dict) -> str:
    """img/s as the summary reports it: over the steps after the first (start-up, compiling and
    evaluations left out)."""
    return "-" if row.get("avg_img_per_s") is None else f"{row['avg_img_per_s']:.1f}"


class _ProgressBar:
    """A rich progress bar fed by the training loop's progress callback, labelled `label`; where
    stderr is not a terminal (a cluster's log file, a pipe), one plain line per logged row instead."""

    def __init__(self, quiet: bool, label: str = "pretrain"):
        self.quiet, self.label = quiet, label
        self.progress = None
        self.task = None
        self.fields = {"loss": "-", "lr": "-", "ips": "-", "epoch": "-"}
        self.lines = not quiet and not err_console.is_terminal
        self.first: tuple[float, int] | None = None  # (time, step) of the first update, for the ETA

    def __enter__(self):
        if not self.quiet and not self.lines:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            # the bar takes what the text leaves, so the numbers fit an 80-column terminal
            self.progress = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[ips]} img/s"),
                TextColumn("ETA"), TimeRemainingColumn(compact=True),
                console=err_console, expand=True,
            )
        return self

    def update(self, step: int, total: int, row: dict | None) -> None:
        if self.lines:
            self._line(step, total, row)
            return
        if self.progress is None:
            return
        if self.task is None:  # shown from the first step on: an error in the checks before it prints alone
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total, completed=step, **self.fields)
        if row is not None:
            self.fields = {
                "loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}",
                "ips": _speed(row), "epoch": f"{row['epoch']:.1f}",
            }
        self.progress.update(self.task, completed=step, **self.fields)

    def _line(self, step: int, total: int, row: dict | None) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (now, step)
        if row is None:
            return
        t0, s0 = self.first
        eta = (now - t0) / (step - s0) * (total - step) if step > s0 else None
        parts = [f"step {step}/{total}", f"epoch {row['epoch']:.2f}", f"loss {row['loss']:.4f}",
                 f"lr {row['lr']:.2e}", f"{_speed(row)} img/s",
                 f"ETA {datetime.timedelta(seconds=round(eta))}" if eta is not None else "ETA -"]
        for key in ("knn_top1", "val_top1"):  # an evaluation's result, where it ran
            if key in row:
                parts.append(f"{key} {100 * row[key]:.2f}")
        sys.stderr.write(f"{self.label} " + "  ".join(parts) + "\n")
        sys.stderr.flush()

    def stop(self):
        if self.progress is not None:
            if self.task is not None:
                self.progress.stop()
            self.progress = None

    def __exit__(self, *exc):
        self.stop()


def _note_slow_bf16(precision: str, device: str) -> None:
    """bf16 asked for on a CPU without bf16 instructions: say so before a run that would crawl."""
    from stoptool.train.runtime import cpu_has_fast_bf16, resolve_device

    if precision == "bf16" and resolve_device(device).type == "cpu" and not cpu_has_fast_bf16():
        _note("this CPU has neither AMX nor AVX-512 BF16, so bf16 runs many times slower than fp32 here; "
              "--precision auto picks fp32")


@app.command()
@user_errors
def info(ckpt: Path = typer.Argument(..., help="A stoptool checkpoint (.safetensors), a run directory (its latest), or a model folder written by export --to hf|transformers."),
         json_out: bool = typer.Option(False, "--json", help="Print the metadata as JSON.")):
    """Show what a checkpoint or model folder holds: arch, σ, step, data, config, parameter counts."""
    from stoptool.io.checkpoint import load_checkpoint, resolve_checkpoint, stoptool_view
    from stoptool.io.folders import describe_folder, is_model_folder

    if is_model_folder(ckpt):
        rows, whole = describe_folder(ckpt)
        if json_out:
            sys.stdout.write(json.dumps(whole, indent=2) + "\n")
        else:
            print_table(f"model folder {ckpt.name}", rows)
        return
    ckpt = resolve_checkpoint(ckpt)
    ck = stoptool_view(load_checkpoint(ckpt))
    meta = ck.meta
    if json_out:
        sys.stdout.write(json.dumps({**meta, "tensors_sha256": ck.digest}, indent=2) + "\n")
        return
    rows = {"file": ckpt, "kind": meta.get("kind", "?"), "size": f"{ckpt.stat().st_size / 2**20:.1f} MiB"}
    for key in ("arch", "img_size", "patch", "sigma", "pred_depth", "pred_width", "pred_pos",
                "noise_on", "cov", "a_l1", "step", "epoch", "precision", "source", "method",
                "mask_token_from", "which", "timm_model", "stoptool_version"):
        if key in meta:
            rows[key] = meta[key]
    if "method_from" in meta and "method" in rows:  # an imported checkpoint: which rule decided
        rows["method"] = f"{meta['method']} ({meta['method_from']})"
    if "data" in meta:
        rows["data"] = ", ".join(f"{k}={v}" for k, v in meta["data"].items())
    if "num_classes" in meta:  # a fine-tuned classifier
        from stoptool.finetune.run import describe_classifier

        rows.update(describe_classifier(meta))
    for part in ("encoder", "target_encoder", "predictor", "head"):
        if ck.has(part):
            n = sum(t.numel() for t in ck.part(part).values())
            rows[f"{part} params"] = f"{n:,}"
    rows["holds"] = ", ".join(p.replace("_", " ") for p in ("encoder", "target_encoder", "predictor", "head")
                              if ck.has(p)) + ("" if ck.has("predictor") else " (no predictor)")
    rows["tensors sha256"] = (f"{ck.digest} (checked)" if ck.digest
                              else "none (written before checkpoints carried one)")
    print_table(f"checkpoint {ckpt.name}", rows)
    if "config" in meta:
        console.print("[bold]config[/]")
        console.print(yaml.safe_dump(meta["config"], sort_keys=False), highlight=False, markup=False, soft_wrap=True)


@app.command("import")
@user_errors
def import_cmd(
    src: Path = typer.Argument(..., help="An official I-JEPA / StoP checkpoint (.pth.tar); encoder weights with timm's or transformers' IJepaModel names (.pth, .bin, .safetensors); or a timm / transformers model folder (export --to hf|transformers writes them)."),
    out: Path = typer.Argument(..., help="The stoptool checkpoint to write (.safetensors)."),
    arch: str | None = typer.Option(None, help="Encoder arch, e.g. vit_h14. (default: inferred from the tensor shapes)"),
    kind: str | None = typer.Option(None, help="stop | ijepa: how the predictor was trained; sets m̃ to b (StoP) or mask_token (I-JEPA). (default: read from the optimizer state or the file name)"),
    sigma: float | None = typer.Option(None, help="StoP noise standard deviation σ to record. (default: 0.25 for StoP, 0.2 for StoP ViT-H, 0 for I-JEPA)"),
):
    """Convert an official I-JEPA / StoP checkpoint, encoder weights or a hub model folder into a stoptool checkpoint."""
    from stoptool.io.official import import_checkpoint

    res = import_checkpoint(src, out, arch=arch, method=kind, sigma=sigma)
    meta = res.meta
    rows = {"checkpoint": res.out, "source": meta["source"], "arch": meta["arch"],
            "img_size": meta["img_size"], "patch": meta["patch"]}
    if "method" in meta:
        rows["kind"] = f"{meta['method']}: {meta['method_from']}"
    if "predictor" in res.parts:
        rows.update({"sigma": meta["sigma"], "predictor": f"{meta['pred_depth']} × {meta['pred_width']}",
                     "pred_pos": meta["pred_pos"], "m̃ from": meta["mask_token_from"]})
    if "epoch" in meta:
        rows["epoch"] = meta["epoch"]
    for part, n in res.params.items():
        rows[f"{part} params"] = f"{n:,}"
    rows["report"] = res.report
    print_table("import", rows)
    for note in res.notes:
        _note(note)


@app.command()
@user_errors
def export(
    ckpt: Path = typer.Argument(..., help="A stoptool checkpoint (.safetensors), or a run directory (its latest)."),
    out: Path = typer.Argument(..., help="What to write: a .safetensors file (--to timm), or a folder (--to hf, --to transformers)."),
    to: str = typer.Option("timm", "--to", help="timm: one safetensors file for timm.create_model | hf: a Hugging Face Hub folder for timm (config.json, model.safetensors, README.md model card) that timm.create_model('local-dir:OUT') loads, and 'hf-hub:ORG/NAME' once uploaded | transformers: a transformers IJepaModel folder with a model card (needs transformers, which stoptool's hf extra installs)."),
    which: str = typer.Option("target", help="Which encoder: target (the EMA one the paper evaluates) | context."),
    license_: str | None = typer.Option(None, "--license", help="Hub license id for the model card of a folder, e.g. mit, apache-2.0, cc-by-nc-4.0. (default: none stated)"),
    force: bool = typer.Option(False, "--force", help="Write the folder into one that is not empty: its config.json, model.safetensors and README.md are replaced, other files (a clone's .git) stay."),
    push: str | None = typer.Option(None, "--push", metavar="ORG/NAME", help="Upload the folder to this Hugging Face Hub model repository, created if missing (needs huggingface_hub and a login: hf auth login)."),
):
    """Write an encoder for timm (one file) or as a Hub model folder with a model card (timm or transformers), and print the Python that loads it."""
    if to not in ("timm", "hf", "transformers"):
        raise UserError(f"--to must be timm, hf or transformers, got '{to}'")
    if to != "timm":
        from stoptool.io.hub import export_folder

        pub = export_folder(ckpt, out, to=to, which=which, license=license_, force=force, push=push)
        rows = {"folder": pub.out, "layout": "timm (local-dir / hf-hub)" if to == "hf" else "transformers IJepaModel",
                "encoder": pub.facts["which"], "arch": pub.facts["arch"], "img_size": pub.facts["img_size"],
                "params": f"{pub.params:,}", "probe results": pub.probes, "report": pub.report}
        if pub.url:
            rows["uploaded to"] = pub.url
        print_table("export", rows)
        for note in pub.notes:
            _note(note)
        console.print("load it with:", highlight=False)
        sys.stdout.write(pub.load + "\n")
        return
    if license_ is not None or push is not None:
        raise UserError("a license and push are for the hub folders (--to hf or --to transformers), not a timm file",
                        key="push" if push is not None else "license")
    from stoptool.io.export import export_timm

    res = export_timm(ckpt, out, which=which)
    print_table("export", {"file": res.out, "encoder": res.meta["which"], "arch": res.meta["arch"],
                           "img_size": res.meta["img_size"], "params": f"{res.params:,}",
                           "timm model": res.meta["timm_model"], "report": res.report})
    console.print("load it with:", highlight=False)
    sys.stdout.write(res.line + "\n")


viz_app = typer.Typer(
    help="Draw the paper's figures: positional similarity (Fig. 5), predicted-token heatmaps "
    "(Fig. 6), multi-block masks, training curves (Fig. 4). PNG by default; .svg/.pdf by the "
    "--out extension. Each figure gets a JSON file of its numbers beside it.",
    no_args_is_help=True,
)
app.add_typer(viz_app, name="viz")

_OUT_HELP = ("Figure file; .png, .svg or .pdf (the numbers go to the same name with .json). "
             "(default: figures/{name}.png beside the {anchor})")
_DPI_HELP = "Resolution of raster output, in dots per inch."


def _report_figure(name: str, result) -> None:
    print_table(f"viz {name}", {**result.rows, "data": result.data})
    console.print(f"wrote {result.figure}", highlight=False, soft_wrap=True)


@viz_app.command("similarity")
@user_errors
def viz_similarity(
    ckpts: list[Path] = typer.Argument(..., metavar="CKPT...", help="One or more stoptool checkpoints with a predictor (.safetensors), or run directories (their latest); e.g. an I-JEPA and a StoP checkpoint."),
    sigma: float | None = typer.Option(None, help="Noise standard deviation σ of the stochastic maps. (default: each checkpoint's σ; for one checkpoint trained with σ = 0, 0.25)"),
    draws: int = typer.Option(256, help="Noise draws n averaged per query (1 to 1,000,000)."),
    queries: str | None = typer.Option(None, help="Query patches: N for an N×N spread over the grid, or ROW,COL;ROW,COL;... (default: 3)"),
    seed: int = typer.Option(0, help="Seed of the noise draws.", min=0, max=SEED_MAX),
    out: Path | None = typer.Option(None, help="Figure file; .png, .svg or .pdf (the numbers go to the same name with .json). (default: figures/similarity.png beside the checkpoint; figures/similarity-compare.png beside the first of several)"),
    dpi: int = typer.Option(150, help=_DPI_HELP),
):
    """Cosine similarity of the stochastic position ψ_q + A n to every deterministic ψ (paper Fig. 5).

    The similarities of each draw are averaged (the mean embedding would just be ψ_q). One checkpoint: its σ = 0 and σ maps on one colour scale, and their difference (σ minus σ = 0) on a diverging scale of its own. Several checkpoints: each at its own σ, side by side on one colour scale, each panel titled with its σ.
    """
    from stoptool.viz.similarity import make_similarity

    _report_figure("similarity", make_similarity(ckpts, out, sigma, draws, queries, seed, dpi))


@viz_app.command("heatmap")
@user_errors
def viz_heatmap(
    ckpt: Path = typer.Argument(..., help="A stoptool checkpoint with a predictor (.safetensors), or a run directory (its latest)."),
    image: Path | None = typer.Argument(None, help="An image; its central square is used. (default: the sample photo shipped with stoptool)"),
    patch: str | None = typer.Option(None, help="Masked patch(es) to explain, ROW,COL;ROW,COL;... each inside a target block. (default: the centre of each target block)"),
    seed: int = typer.Option(0, help="Seed of the sampled mask (the checkpoint's mask settings).", min=0, max=SEED_MAX),
    temperature: float = typer.Option(0.1, help="Softmax temperature τ over the cosine similarities."),
    out: Path | None = typer.Option(None, help=_OUT_HELP.format(name="heatmap", anchor="checkpoint")),
    dpi: int = typer.Option(150, help=_DPI_HELP),
):
    """Where a masked patch's prediction points: softmax over tokens of cos(prediction, target) (paper Fig. 6).

    The model runs in eval mode (no noise); targets are the target encoder's layer-normed
    tokens of the whole image. Context (green) and target blocks are outlined; a legend names every mark.
    """
    from stoptool.viz.heatmap import make_heatmap

    _report_figure("heatmap", make_heatmap(ckpt, image, out, patch, seed, temperature, dpi))


@viz_app.command("masks")
@user_errors
@with_options(declared(MaskConfig))
def viz_masks(
    image: Path | None = typer.Argument(None, help="An image; its central square is used. (default: the sample photo shipped with stoptool)"),
    seeds: str = typer.Option("0,1,2,3", help="Comma-separated seeds, one panel each."),
    config: str | None = typer.Option(None, "--config", help="Mask and size settings from a preset name or a YAML file (a run's config.yaml works); flags override it. (default: pretrain's defaults)"),
    img_size: int | None = typer.Option(None, help="Image side in pixels. (default: from --config, else 32)"),
    patch: int | None = typer.Option(None, help="Patch size in pixels. (default: the patch of the config's arch, else 4)"),
    out: Path = typer.Option(Path("masks.png"), help="Figure file; .png, .svg or .pdf (the numbers go to the same name with .json)."),
    dpi: int = typer.Option(150, help=_DPI_HELP),
    overrides: dict | None = None,
):
    """Multi-block masks (context and target blocks) drawn on an image for a few seeds."""
    from stoptool.viz.masks import make_masks

    try:
        seed_list = [int(s) for s in seeds.replace(" ", "").split(",") if s]
    except ValueError:
        raise UserError(f"--seeds takes integers separated by commas, got '{seeds}'") from None
    if any(not 0 <= s <= SEED_MAX for s in seed_list):
        raise UserError(f"--seeds must each be between 0 and {SEED_MAX}, got '{seeds}'")
    overrides = {**overrides, "img_size": img_size, "patch": patch}
    _report_figure("masks", make_masks(image, out, seed_list, config, overrides, dpi))


@viz_app.command("curves")
@user_errors
def viz_curves(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories written by stoptool pretrain."),
    out: Path | None = typer.Option(None, help=_OUT_HELP.format(name="curves", anchor="first run")),
    dpi: int = typer.Option(150, help=_DPI_HELP),
):
    """Loss, lr, ‖A‖ and ‖m̃‖ against step, runs overlaid with their σ (paper Fig. 4 for a σ sweep)."""
    from stoptool.viz.curves import make_curves

    _report_figure("curves", make_curves(run_dirs, out, dpi))


@app.command()
@user_errors
@with_options(declared(BenchConfig))
def bench(
    json_out: Path | None = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
    overrides: dict | None = None,
):
    """Measure img/s, FLOPs per image, achieved FLOP/s and its share of the device's matmul rate.

    With --config PRESET, time the step that preset trains and project the wall-clock of its whole schedule (on one device, and on --devices N by linear scaling).
    """
    from stoptool.bench import bench as run_bench
    from stoptool.config import bench_config

    cfg = bench_config(overrides)
    if json_out is not None:
        if json_out.is_dir():
            raise UserError(f"--json '{json_out}' is a directory; give a file name")
        check_writable(json_out)
    _note_slow_bf16(cfg.precision, cfg.device)
    result = run_bench(cfg)  # validates arch, sizes and predictor shape before any work
    if cfg.what == "data":
        rows = _data_rows(result)
    elif cfg.what == "finetune":
        from stoptool.finetune.bench import bench_rows

        rows = bench_rows(result)
    elif cfg.what == "masks":
        rows = {
            "grid": f"{result['grid']}×{result['grid']}", "batch": cfg.batch_size, "threads": 1,
            "batches/s": f"{result['batches_per_s']:.1f} (min {result['batches_per_s_min']:.1f}, max {result['batches_per_s_max']:.1f})",
            "ms/batch": f"{result['ms_per_batch']:.2f}",
        }
    else:
        rows = {
            "what": cfg.what, "arch": f"{cfg.arch} @ {result['img_size']}px, batch {cfg.batch_size}",
            **({"predictor": f"{result['pred_depth']} × {result['pred_width']}"} if cfg.what == "train" else {}),
            "device": f"{result['device']} ({result['torch_threads']} threads)", "precision": result["precision"],
            "img/s": f"{result['img_per_s']:.1f} (min {result['img_per_s_min']:.1f}, max {result['img_per_s_max']:.1f})",
            "ms/step": f"{result['ms_per_step']:.1f}",
            "GFLOP/image": f"{result['flops_per_image'] / 1e9:.2f}",
            "achieved": f"{result['achieved_flops'] / 1e9:.1f} GFLOP/s",
            "matmul rate": f"{result['matmul_flops'] / 1e9:.1f} GFLOP/s ({result['precision']})",
            "share of matmul rate": f"{100 * result['share_of_matmul_rate']:.1f} %",
            "peak memory": f"{result['peak_memory_mib']:.0f} MiB",
        }
        if "compile_failed" in result:
            rows["compile"] = f"unavailable, ran eagerly: {result['compile_failed']}"
        rows["attention"] = result["attn"]
        if cfg.vary_masks and "mask_shapes" in result:
            rows["mask shapes met"] = result["mask_shapes"]
        if "compiled_graphs" in result:
            rows["graphs compiled"] = result["compiled_graphs"]
        if cfg.accum_steps > 1:
            rows["micro-batches"] = f"{cfg.accum_steps} of {cfg.batch_size // cfg.accum_steps}"
        if "projected_hours" in result:
            rows.update(_projection_rows(cfg, result))
    print_table("bench", rows)
    if json_out:
        from stoptool.io.paths import write_report

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_report(json_out, result)
        console.print(f"wrote {json_out}", highlight=False, markup=False, soft_wrap=True)


def _data_rows(r: dict) -> dict:
    workers = f"{r['workers']} workers" if r["workers"] else "main process"
    return {
        "what": "data (the pretraining input pipeline)", "dataset": f"{r['dataset']} ({r['dataset_images']:,} images)",
        "pipeline": f"{r['img_size']} px crops of {r['crop_scale'][0]}–{r['crop_scale'][1]}, {r['interpolation']}, "
                    f"decode on {r['decode']}; masks and collate",
        "batch": f"{r['batch_size']}, {workers} ({r['cores']} core{'s' if r['cores'] > 1 else ''})",
        "img/s": f"{r['img_per_s']:.1f} (min {r['img_per_s_min']:.1f}, max {r['img_per_s_max']:.1f})",
        "img/s per core": f"{r['img_per_s_per_core']:.1f}",
        "ms/batch": f"{r['ms_per_batch']:.1f}",
        **({"skipped": f"{r['skipped']} unreadable"} if r["skipped"] else {}),
    }


def _projection_rows(cfg: BenchConfig, r: dict) -> dict:
    """A preset's whole schedule at the measured rate, as `bench --config` prints it."""
    data = r["dataset"] + (" (ImageNet-1k train)" if r["dataset"] == "imagenet" else "")
    rows = {
        "preset": cfg.config,
        "schedule": f"{r['epochs']:,} epochs × {r['iterations_per_epoch']:,} steps = {r['schedule_steps']:,} "
                    f"steps of {r['global_batch']:,} images ({r['images_seen']:,} images)",
        "data": f"{data}: {r['dataset_images']:,} training images",
        "projected, 1 device": f"{_duration(r['projected_hours'])} at the img/s above",
    }
    if cfg.devices > 1:
        rows[f"projected, {cfg.devices} devices"] = (
            f"{_duration(r['projected_hours_devices'])}: a linear-scaling estimate ({cfg.devices} × the img/s "
            "above; communication not counted)")
    rows["not counted"] = "data loading, checkpoints, evaluation, start-up"
    return rows


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:,.1f} h" + (f" ({hours / 24:,.1f} days)" if hours >= 48 else "")


@app.command()
@user_errors
@with_options(declared(ProbeConfig))
def probe(
    quiet: bool = quiet_option(),
    overrides: dict | None = None,
):
    """Linear, logistic and k-NN probes of frozen encoder features (top-1, top-5), as a table and JSON."""
    from stoptool.probe.run import run_probe

    cfg = build(ProbeConfig, overrides)
    _note_slow_bf16(cfg.precision, cfg.device)
    with _SplitBar("features", quiet) as bar:
        report = run_probe(cfg, progress=bar.update)
    _print_columns(report.title(), report.COLUMNS, report.table(), left=("method", "layers"))
    _say(report.closing())
    for note in report.notes:
        _note(note)


def _print_columns(title: str, columns: tuple[str, ...], rows: list[tuple], left: tuple[str, ...] = ()) -> None:
    """A table with a header row; columns named in `left` align left, the others (numbers) right."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


class _SplitBar:
    """A rich progress bar, one task per split, labelled `label`; it appears with the first
    update, so an error found before the work starts is the only thing printed. Where stderr
    is not a terminal, `lines` prints a plain line every 30 seconds and at each split's end
    instead (none when `quiet`)."""

    def __init__(self, label: str, quiet: bool = False, lines: bool = False):
        self.label, self.quiet, self.progress, self.tasks = label, quiet, None, {}
        self.lines, self.last = lines and not err_console.is_terminal, time.monotonic()

    def __enter__(self):
        return self

    def update(self, split: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.lines:
            if done == total or time.monotonic() - self.last >= 30:
                self.last = time.monotonic()
                sys.stderr.write(f"{self.label} {split} {done:,}/{total:,} images\n")
                sys.stderr.flush()
            return
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn(f"[bold]{self.label} {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("ETA"), TimeRemainingColumn(compact=True), console=err_console, transient=True,
            )
            self.progress.start()
        if split not in self.tasks:
            self.tasks[split] = self.progress.add_task(split, total=total)
        self.progress.update(self.tasks[split], completed=done)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()


@app.command()
@user_errors
def prepare(
    src: str = typer.Argument(..., help="An ImageFolder tree (train/ and optionally val/, one folder per class in each; or the class folders alone, a train split), or cifar10 | cifar100 (from --data-root; its test split becomes val)."),
    dst: Path = typer.Argument(..., help="The directory to write: new or empty."),
    short_side: int = typer.Option(256, help="Shrink images whose short side is longer to this many pixels, aspect kept (at least 16); JPEGs already this small are copied unchanged."),
    shard_size: str = typer.Option("1GB", help="Largest shard: bytes, or with a unit: 64KB, 500MB, 1GB (decimal), 1GiB (binary)."),
    quality: int = typer.Option(90, help="JPEG quality (1 to 100) of the images re-encoded."),
    workers: int | None = typer.Option(None, help="Processes that decode and encode images; 0 = in this one. The output is the same for any number. (default: the CPUs available)"),
    seed: int = typer.Option(0, help="Seed of the order images are written in (shuffled once, so every shard mixes the classes).", min=0, max=SEED_MAX),
    data_root: Path | None = typer.Option(None, help="Where CIFAR's release archive or extracted folder lives. (default: ~/.cache/stoptool/data)"),
):
    """Write an image set once as WebDataset tar shards of JPEGs shrunk to --short-side, with an index: what training reads fastest.

    Unreadable images are skipped and listed in DST/SPLIT.skipped.txt. The set is written into a hidden directory beside DST and renamed to DST when complete.
    """
    from stoptool.data.prepare import describe
    from stoptool.data.prepare import prepare as run_prepare

    with _SplitBar("prepare", lines=True) as bar:
        index = run_prepare(src, dst, short_side=short_side, shard_size=shard_size, quality=quality, seed=seed,
                            workers=workers, data_root=data_root, progress=bar.update)
    console.print(describe(index, dst), highlight=False, markup=False, soft_wrap=True)


@app.command()
@user_errors
def sweep(
    spec: str = typer.Argument(..., help="A sweep spec (YAML: base, grid, probe), or the name of a shipped one: table6-pred-pos, table7-noise-on, fig3-cov, sigma-grid (CPU scale on digits) and the same names with -in1k (full scale, on the ImageNet presets)."),
    out: Path | None = typer.Option(None, "--out", help="Directory of the sweep: one run directory per grid point, named from its values (e.g. sigma=0.25,seed=1). (default: runs/sweeps/<spec name>)"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Set a base config key of every run (repeatable; VALUE is YAML), or a probe option as probe.KEY=VALUE, e.g. --set dataset=/data/imagenet --set probe.dataset=/data/imagenet."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and where each stands (probed, trained, partial at step N, not started) and exit."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Runs at a time, each a subprocess with cores / N threads."),
    emit: str | None = typer.Option(None, "--emit", help="slurm: write DIR/sweep.slurm, an array job with one task per run | commands: write DIR/commands.txt, one line per run. Nothing runs."),
):
    """Pretrain every run of a grid × seeds and probe each; started again, it skips what is done and resumes what was interrupted.

    Every run's config is built and checked before anything runs. Summarize with: stoptool report DIR.
    """
    from stoptool.sweep import load_sweep, run_sweep, states
    from stoptool.train.fit import Interrupted

    if emit is not None and emit not in ("slurm", "commands"):
        raise UserError(f"--emit takes slurm or commands, got '{emit}'")
    plan = load_sweep(spec, out, set_)
    if emit:
        from stoptool.sweep import emit as write_commands

        path = write_commands(plan, emit)
        console.print(f"wrote {path} ({len(plan.runs)} runs)", highlight=False, markup=False, soft_wrap=True)
        return
    if dry_run:
        _sweep_table(f"sweep {plan.label} in {plan.out} (dry run)", [(r.name, str(s)) for r, s in zip(plan.runs, states(plan))])
        return
    try:
        outcomes = run_sweep(plan, parallel, notify=_note)
    except Interrupted as stop:
        err_console.print(f"interrupted: checkpoint saved to {stop.checkpoint}; run the sweep again to resume", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(128 + stop.signum) from None
    rows = [(o.run.name, str(o.state), f"{o.seconds:.0f}" if o.seconds else "-",
             ", ".join(f"{k} {v:.2f}" for k, v in o.metrics.items() if k.endswith("top1")) or "-") for o in outcomes]
    _sweep_table(f"sweep {plan.label} in {plan.out}", rows, ("run", "state", "seconds", "probe top-1 (%)"))
    failed = [o for o in outcomes if o.error]
    console.print(f"summarize with: stoptool report {plan.out}", highlight=False, markup=False, soft_wrap=True)
    if failed:
        err_console.print(f"error: {len(failed)} of {len(outcomes)} runs failed: " + "; ".join(f"{o.run.name}: {o.error}" for o in failed), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)


def _sweep_table(title: str, rows: list[tuple], columns: tuple = ("run", "state")) -> None:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
@user_errors
def report(
    sweep_dir: Path = typer.Argument(..., metavar="DIR", help="A sweep's directory (its --out), or any directory of run directories."),
    by: list[str] = typer.Option([], "--by", metavar="FIELD", help="Group by this config key (repeatable). (default: the grid's fields other than seed)"),
    baseline: str | None = typer.Option(None, "--baseline", metavar="FIELD=VALUE", help="Also give each group's paired difference from the group with FIELD=VALUE (its other fields equal), over the seeds both have, with a 95 % t-interval."),
    json_out: Path | None = typer.Option(None, "--json", metavar="FILE", help="Write the groups and statistics as JSON."),
    markdown_out: Path | None = typer.Option(None, "--markdown", metavar="FILE", help="Write the table as Markdown."),
    plot_out: Path | None = typer.Option(None, "--plot", metavar="FILE", help="Draw each metric's group means with ± sd error bars (.png, .svg or .pdf; the numbers go beside it as .json)."),
):
    """Mean ± sd of every probe metric per group of a sweep's runs, and paired differences from a baseline.

    Runs without probe results (not started, partial, not probed, failed) are listed below the table, not counted.
    """
    from stoptool.report import check_outputs, make_report, plot, table_rows, write_outputs

    plot_out = check_outputs(json_out, markdown_out, plot_out)
    result = make_report(sweep_dir, by, baseline)
    header, rows = table_rows(result)
    table = Table(title=f"report {sweep_dir}: mean ± sd (probe metrics in %)", title_justify="left")
    for col in header:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for name, state in result.excluded:
        console.print(f"not included: {name} ({state})", highlight=False, markup=False, soft_wrap=True)
    write_outputs(result, json_out, markdown_out)
    if plot_out is not None:
        plot(result, plot_out)
    for path in (json_out, markdown_out, plot_out):
        if path is not None:
            console.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


@app.command()
@user_errors
@with_options(finetune_fields(), finetune_panels())
def finetune(
    config: str | None = config_option("finetune-in1k-1pct"),
    set_: list[str] = set_option("finetune", "--set lr=3e-5 --set by_size={h: {wd: 0.4}}"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from the run directory's latest checkpoint."),
    print_config: bool = print_config_option(),
    quiet: bool = quiet_option(),
    overrides: dict | None = None,
):
    """Fine-tune an encoder end to end with a new linear head on labelled images (the paper's Table 5), and report top-1 and top-5 on the val (or test) split, as a table and JSON.

    Presets: finetune-in1k-1pct (I-JEPA's 1 % recipe: give --subset 1percent.txt) and finetune-in1k (MAE's); without one, a CPU-sized run on digits. Every option is also a config key (--set KEY=VALUE, presets, YAML files). Under torchrun (torchrun --nproc-per-node N -m stoptool finetune ...) the processes train one classifier data-parallel; --batch-size is the global batch.
    """
    from stoptool.finetune.config import build_finetune_config, parse_set

    cfg = build_finetune_config(config, {**overrides, **parse_set(set_)})
    if print_config:
        from stoptool.finetune.model import describe_source

        known = cfg.random_init or cfg.ckpt is not None  # the size-dependent values need the encoder's arch
        sys.stdout.write((cfg.for_arch(describe_source(cfg)[0]) if known else cfg).to_yaml())
        return
    from stoptool.finetune.run import finetune as run_finetune
    from stoptool.train.distributed import world_from_env
    from stoptool.train.fit import Interrupted

    main_rank = world_from_env().main  # under torchrun, rank 0 alone reports
    if main_rank:
        _note_slow_bf16(cfg.precision, cfg.device)
    with _ProgressBar(quiet or not main_rank, label="finetune") as bar:
        try:
            result = run_finetune(cfg, resume=resume, progress=bar.update, notify=_note if main_rank else None)
        except Interrupted as stop:
            bar.stop()
            if main_rank:
                err_console.print(f"interrupted: checkpoint saved to {stop.checkpoint}", highlight=False, markup=False,
                                  soft_wrap=True)
            raise typer.Exit(128 + stop.signum) from None
    if not main_rank:
        return
    if result.already_done:
        _say(f"run in {result.run_dir} is already complete at step {result.step}; its weights evaluated again "
             "(--steps/--epochs go further, --no-resume starts over)")
    print_table("finetune", result.rows())


def main() -> None:
    """Run the app; a mistyped command line, like any other bad input, is one line and exit 2."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as err:  # typer's usage errors (bad option, bad value, no command)
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            err_console.print(f"error: {err.format_message()}{hint}", highlight=False, markup=False,
                              soft_wrap=True)
        code = getattr(err, "exit_code", 2)
    except typer.Abort:
        err_console.print("aborted", highlight=False)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
