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
from stoptool.evaluate.config import EvaluateConfig
from stoptool.io.options import ExportOptions, ImportOptions, InfoOptions
from stoptool.io.paths import check_writable
from stoptool.masks import MaskConfig
from stoptool.options import build, checked, declared
from stoptool.probe.config import ProbeConfig
from stoptool.track.config import TrackConfig
from stoptool.viz.options import (
    CurvesOptions,
    HeatmapOptions,
    MasksOptions,
    SimilarityOptions,
    TrackFigureOptions,
)

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
    """A rich progress bar fed by the training loop's progress callback; where stderr is not a
    terminal (a cluster's log file, a pipe), one plain line per logged row instead."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
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
                TextColumn("[bold]pretrain"), BarColumn(bar_width=None), MofNCompleteColumn(),
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
            self.task = self.progress.add_task("pretrain", total=total, completed=step, **self.fields)
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
        if "knn_top1" in row:
            parts.append(f"knn_top1 {100 * row['knn_top1']:.2f}")
        sys.stderr.write("pretrain " + "  ".join(parts) + "\n")
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
@with_options(declared(InfoOptions))
def info(overrides: dict | None = None):
    """Show what a checkpoint or model folder holds: arch, σ, step, data, config, parameter counts."""
    from stoptool.io.info import describe

    opts = checked(InfoOptions, overrides)
    found = describe(opts.ckpt)
    if opts.json:
        sys.stdout.write(json.dumps(found.data, indent=2) + "\n")
        return
    print_table(found.title, found.rows)
    if found.config is not None:
        console.print("[bold]config[/]")
        _say(yaml.safe_dump(found.config, sort_keys=False))


@app.command("import")
@user_errors
@with_options(declared(ImportOptions))
def import_cmd(overrides: dict | None = None):
    """Convert an official I-JEPA / StoP checkpoint, encoder weights or a hub model folder into a stoptool checkpoint."""
    from stoptool.io.official import import_checkpoint

    opts = checked(ImportOptions, overrides)
    res = import_checkpoint(Path(opts.src), Path(opts.out), arch=opts.arch, method=opts.kind, sigma=opts.sigma)
    print_table("import", res.rows())
    for note in res.notes:
        _note(note)


@app.command()
@user_errors
@with_options(declared(ExportOptions))
def export(overrides: dict | None = None):
    """Write an encoder for timm (one file) or as a Hub model folder with a model card (timm or transformers), and print the Python that loads it."""
    opts = checked(ExportOptions, overrides)
    ckpt, out = Path(opts.ckpt), Path(opts.out)
    if opts.to == "timm":
        if opts.license is not None or opts.push is not None:
            raise UserError("a license and push are for the hub folders (--to hf or --to transformers), not a "
                            "timm file", key="push" if opts.push is not None else "license")
        from stoptool.io.export import export_timm

        done = export_timm(ckpt, out, which=opts.which)
        notes, load = [], done.line
    else:
        from stoptool.io.hub import export_folder

        done = export_folder(ckpt, out, to=opts.to, which=opts.which, license=opts.license, force=opts.force,
                             push=opts.push)
        notes, load = done.notes, done.load
    print_table("export", done.rows())
    for note in notes:
        _note(note)
    console.print("load it with:", highlight=False)
    sys.stdout.write(load + "\n")


viz_app = typer.Typer(
    help="Draw the paper's figures: positional similarity (Fig. 5), predicted-token heatmaps "
    "(Fig. 6), multi-block masks, training curves (Fig. 4). PNG by default; .svg/.pdf by the "
    "--out extension. Each figure gets a JSON file of its numbers beside it.",
    no_args_is_help=True,
)
app.add_typer(viz_app, name="viz")

def _report_figure(name: str, result) -> None:
    print_table(f"viz {name}", {**result.rows, "data": result.data})
    console.print(f"wrote {result.figure}", highlight=False, soft_wrap=True)


@viz_app.command("similarity")
@user_errors
@with_options(declared(SimilarityOptions))
def viz_similarity(overrides: dict | None = None):
    """Cosine similarity of the stochastic position ψ_q + A n to every deterministic ψ (paper Fig. 5).

    The similarities of each draw are averaged (the mean embedding would just be ψ_q). One checkpoint: its σ = 0 and σ maps on one colour scale, and their difference (σ minus σ = 0) on a diverging scale of its own. Several checkpoints: each at its own σ, side by side on one colour scale, each panel titled with its σ.
    """
    from stoptool.viz.similarity import make_similarity

    o = checked(SimilarityOptions, overrides)
    _report_figure("similarity", make_similarity([Path(c) for c in o.ckpts], o.out, o.sigma, o.draws, o.queries,
                                                 o.seed, o.dpi))


@viz_app.command("heatmap")
@user_errors
@with_options(declared(HeatmapOptions))
def viz_heatmap(overrides: dict | None = None):
    """Where a masked patch's prediction points: softmax over tokens of cos(prediction, target) (paper Fig. 6).

    The model runs in eval mode (no noise); targets are the target encoder's layer-normed
    tokens of the whole image. Context (green) and target blocks are outlined; a legend names every mark.
    """
    from stoptool.viz.heatmap import make_heatmap

    o = checked(HeatmapOptions, overrides)
    _report_figure("heatmap", make_heatmap(o.ckpt, o.image, o.out, o.patch, o.seed, o.temperature, o.dpi))


@viz_app.command("masks")
@user_errors
@with_options(declared(MasksOptions) + declared(MaskConfig))
def viz_masks(overrides: dict | None = None):
    """Multi-block masks (context and target blocks) drawn on an image for a few seeds."""
    from stoptool.viz.masks import make_masks

    own = {f.name for f in declared(MasksOptions)}
    o = checked(MasksOptions, {k: v for k, v in overrides.items() if k in own})
    masks = {k: v for k, v in overrides.items() if k not in own}
    masks.update(img_size=o.img_size, patch=o.patch)
    _report_figure("masks", make_masks(o.image, o.out, o.seed_list(), o.config, masks, o.dpi))


@viz_app.command("curves")
@user_errors
@with_options(declared(CurvesOptions))
def viz_curves(overrides: dict | None = None):
    """Loss, lr, ‖A‖ and ‖m̃‖ against step, runs overlaid with their σ (paper Fig. 4 for a σ sweep)."""
    from stoptool.viz.curves import make_curves

    o = checked(CurvesOptions, overrides)
    _report_figure("curves", make_curves([Path(r) for r in o.run_dirs], o.out, o.dpi))


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
    instead (none when `quiet`), counting `unit`."""

    def __init__(self, label: str, quiet: bool = False, lines: bool = False, unit: str = "images"):
        self.label, self.quiet, self.progress, self.tasks, self.unit = label, quiet, None, {}, unit
        self.lines, self.last = lines and not err_console.is_terminal, time.monotonic()

    def __enter__(self):
        return self

    def update(self, split: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.lines:
            if done == total or time.monotonic() - self.last >= 30:
                self.last = time.monotonic()
                sys.stderr.write(f"{self.label} {split} {done:,}/{total:,}{' ' + self.unit if self.unit else ''}\n")
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
    src: str = typer.Argument(..., help="An ImageFolder tree (train/ and optionally val/, one folder per class in each; or the class folders alone, a train split), cifar10 | cifar100 (from --data-root; its test split becomes val), or a transfer set in its release layout: clevr-count:PATH | clevr-dist:PATH | inat18:PATH | places205:PATH."),
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
@with_options(declared(TrackConfig))
def track(
    quiet: bool = quiet_option(),
    overrides: dict | None = None,
):
    """DAVIS 2017 video object segmentation by label propagation (paper Table 3): J, F and J&F, as the official evaluation.

    Each sequence's first-frame masks are carried through the video by the encoder's patch-feature affinities (DINO's protocol, its settings as options); the masks are written as palette PNGs in DAVIS's layout (OUT/SEQ/00000.png ...) and scored per object, the results written as the official evaluation's CSVs and as JSON. With --score-only PRED_DIR, any method's masks are scored instead.
    """
    from stoptool.track.run import run_track

    cfg = build(TrackConfig, overrides)
    if cfg.score_only is None:
        _note_slow_bf16(cfg.precision, cfg.device)
    with _SplitBar("track", quiet, lines=True, unit="") as bar:
        report = run_track(cfg, progress=bar.update)
    if report.scores:
        _print_columns(f"{report.title()}: per object (%)", report.COLUMNS, report.table(), left=("Sequence",))
    print_table(f"{report.title()} (%)", report.rows())
    _say(report.closing())
    for note in report.notes:
        _note(note)


@app.command()
@user_errors
@with_options(declared(EvaluateConfig))
def evaluate(
    quiet: bool = quiet_option(),
    overrides: dict | None = None,
):
    """Run a suite of frozen-encoder evaluations (the paper's Table 4 or Table 1) on every task whose data is under --data-root, for each checkpoint or timm:MODEL, and lay the results out as the paper's table beside its rows.

    Writes SUITE.json, SUITE.md and a bar chart SUITE.png into --out. Features are cached and each task's result is kept as it is known: the same command again resumes where it stopped.
    """
    from stoptool.evaluate.run import run_evaluate
    from stoptool.viz.transfer import draw_chart

    cfg = build(EvaluateConfig, overrides)
    _note_slow_bf16(cfg.precision, cfg.device)
    with _SplitBar("features", quiet) as bar:
        report = run_evaluate(cfg, progress=bar.update, notify=_note)
    draw_chart(report)
    _print_columns(report.title(), report.header(), report.table(), left=("model", "arch"))
    _say(report.closing())
    for note in report.notes:
        _note(note)


@viz_app.command("track")
@user_errors
@with_options(declared(TrackFigureOptions))
def viz_track(overrides: dict | None = None):
    """Frames of a DAVIS sequence with the propagated masks over them, above the ground truth, each titled with its J&F."""
    from stoptool.viz.track import make_track

    o = checked(TrackFigureOptions, overrides)
    _report_figure("track", make_track(o.run_or_dir, o.seq, o.davis, o.frames, o.gif, o.out, o.dpi))


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
