"""The `stoptool` command line: parse, validate, call, report. No method code lives here."""

import datetime
import errno
import functools
import json
import sys
import time
from functools import partial
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stoptool.cliopts import config_option, print_config_option, quiet_option, set_option, with_options
from stoptool.config import BenchConfig, option_fields, option_panels
from stoptool.data.prepare import PrepareOptions
from stoptool.errors import UserError
from stoptool.evaluate.config import EvaluateConfig
from stoptool.finetune.config import cli_fields as finetune_fields
from stoptool.finetune.config import panels as finetune_panels
from stoptool.io.options import ExportOptions, ImportOptions, InfoOptions
from stoptool.io.paths import check_writable
from stoptool.masks import MaskConfig
from stoptool.options import build, checked, declared
from stoptool.probe.config import ProbeConfig
from stoptool.report import ReportOptions
from stoptool.sweep import Outcome, SweepOptions
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
    rich_markup_mode=None,  # plain help: wrapped to the terminal, nothing cut, one style for every command
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


@app.command(short_help="Pretrain an encoder: I-JEPA with StoP (σ > 0), or plain (σ = 0).")
@user_errors
@with_options(option_fields(), option_panels())
def pretrain(
    config: str | None = config_option("stop-vitb16-in1k"),
    set_: list[str] = set_option("pretrain", "--set ema=[0.99,1.0] --set min_keep=null"),
    resume: bool = typer.Option(True, "--resume/--no-resume", show_default=False, help="Resume from the run directory's latest checkpoint. (default: on)"),
    print_config: bool = print_config_option(),
    quiet: bool = quiet_option(),
    overrides: dict | None = None,
):
    """Pretrain an encoder with I-JEPA + StoP (σ > 0) or plain I-JEPA (σ = 0).

    Every option below is also a config key (--set KEY=VALUE, presets, YAML files). Under torchrun (torchrun --nproc-per-node N -m stoptool pretrain ...) the processes train one model data-parallel (--fsdp for models too large for a replica per GPU); --batch-size is the global batch.
    """
    from stoptool.config import build_config, parse_set

    cfg = build_config(config, {**overrides, **parse_set(set_)}, resume=resume and not print_config)
    if print_config:
        sys.stdout.write(cfg.to_yaml())
        return
    from stoptool.train.pretrain import pretrain as run_pretrain

    result = _train_launch("pretrain", partial(run_pretrain, cfg, resume=resume), quiet, cfg.runtime.precision,
                           cfg.runtime.device)
    if result is None:
        return
    if result.already_done:
        _say(f"run in {result.run_dir} is already complete at step {result.step}; "
             "use --steps/--epochs to go further or --no-resume to start over")
        return
    print_table("pretrain", result.rows())


def _train_launch(command: str, run, quiet: bool, precision: str, device: str):
    """One launch of a training command: `run(progress=, notify=)` behind a progress bar, an
    interrupt told in one line (exit 128 + signal); under torchrun rank 0 alone reports, and
    the other ranks get None."""
    from stoptool.train.distributed import world_from_env
    from stoptool.train.fit import Interrupted

    main_rank = world_from_env().main
    if main_rank:
        _note_slow_bf16(precision, device)
    with _ProgressBar(quiet or not main_rank, label=command) as bar:
        try:
            result = run(progress=bar.update, notify=_note if main_rank else None)
        except Interrupted as stop:
            bar.stop()
            if main_rank:
                err_console.print(stop.line(command), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(128 + stop.signum) from None
    return result if main_rank else None


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
    """The hardware's word on a precision asked for (see `runtime.slow_precision`), as a note."""
    from stoptool.train.runtime import slow_precision

    said = slow_precision(precision, device)
    if said:
        _note(said)


@app.command(short_help="What a checkpoint or model folder holds.")
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


@app.command("import", short_help="Official I-JEPA/StoP checkpoints and hub folders -> stoptool.")
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


@app.command(short_help="An encoder for timm, or a Hub folder with a model card.")
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
    short_help="The paper's figures: Fig. 4, 5, 6, masks, DAVIS masks.",
    help="Draw the paper's figures: positional similarity (Fig. 5), predicted-token heatmaps "
    "(Fig. 6), multi-block masks, training curves (Fig. 4), and DAVIS masks propagated by `stoptool "
    "track`. PNG by default; .svg/.pdf by the --out extension. Each figure gets a JSON file of its "
    "numbers beside it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(viz_app, name="viz")

def _report_figure(name: str, result) -> None:
    print_table(f"viz {name}", {**result.rows, "data": result.data})
    console.print(f"wrote {result.figure}", highlight=False, soft_wrap=True)


@viz_app.command("similarity", short_help="Positional similarity maps (paper Fig. 5).")
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


@viz_app.command("heatmap", short_help="Predicted-token heatmaps (paper Fig. 6).")
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


@viz_app.command("masks", short_help="Multi-block masks drawn on an image.")
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


@viz_app.command("curves", short_help="Loss, lr, ‖A‖ and ‖m̃‖ over training (paper Fig. 4).")
@user_errors
@with_options(declared(CurvesOptions))
def viz_curves(overrides: dict | None = None):
    """Loss, lr, ‖A‖ and ‖m̃‖ against step, runs overlaid with their σ (paper Fig. 4 for a σ sweep)."""
    from stoptool.viz.curves import make_curves

    o = checked(CurvesOptions, overrides)
    _report_figure("curves", make_curves([Path(r) for r in o.run_dirs], o.out, o.dpi))


@app.command(short_help="img/s, FLOPs and the share of the matmul rate.")
@user_errors
@with_options(declared(BenchConfig))
def bench(overrides: dict | None = None):
    """Measure img/s, FLOPs per image, achieved FLOP/s and its share of the device's matmul rate.

    With --config PRESET, time the step that preset trains and project the wall-clock of its whole schedule (on one device, and on --devices N by linear scaling).
    """
    from stoptool.bench import bench as run_bench
    from stoptool.bench import table_rows
    from stoptool.config import bench_config

    cfg = bench_config(overrides)
    json_out = Path(cfg.json) if cfg.json else None
    if json_out is not None:
        if json_out.is_dir():
            raise UserError(f"--json '{json_out}' is a directory; give a file name")
        check_writable(json_out)
    _note_slow_bf16(cfg.precision, cfg.device)
    result = run_bench(cfg)  # validates arch, sizes and predictor shape before any work
    print_table("bench", table_rows(cfg, result))
    if json_out:
        from stoptool.io.paths import write_report

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_report(json_out, result)
        _say(f"wrote {json_out}")


@app.command(short_help="Linear, logistic and k-NN probes of frozen features.")
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
        report = run_probe(cfg, progress=bar.update, notify=_note)
    _print_columns(report.title(), report.COLUMNS, report.table(), left=("method", "layers"))
    _say(report.closing())
    for note in report.notes:
        _note(note)


def _print_columns(title: str, columns: tuple[str, ...], rows: list[tuple], left: tuple[str, ...] = (),
                   fold: bool = False) -> None:
    """A table with a header row; columns named in `left` align left, the others (numbers) right;
    with `fold`, every column is left-aligned and long cells wrap instead of being cut."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        if fold:
            table.add_column(col, overflow="fold")
        else:
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


@app.command(short_help="An image set as WebDataset tar shards, read fastest.")
@user_errors
@with_options(declared(PrepareOptions))
def prepare(overrides: dict | None = None):
    """Write an image set once as WebDataset tar shards of JPEGs shrunk to --short-side, with an index: what training reads fastest.

    Unreadable images are skipped and listed in DST/SPLIT.skipped.txt. The set is written into a hidden directory beside DST and renamed to DST when complete.
    """
    from stoptool.data.prepare import describe
    from stoptool.data.prepare import prepare as run_prepare

    o = checked(PrepareOptions, overrides)
    with _SplitBar("prepare", lines=True) as bar:
        index = run_prepare(o.src, Path(o.dst), short_side=o.short_side, shard_size=o.shard_size, quality=o.quality,
                            seed=o.seed, workers=o.workers, data_root=o.data_root, progress=bar.update)
    _say(describe(index, Path(o.dst)))


@app.command(short_help="A grid of runs × seeds, each pretrained and probed.")
@user_errors
@with_options(declared(SweepOptions))
def sweep(overrides: dict | None = None):
    """Pretrain every run of a grid × seeds and probe each; started again, it skips what is done and resumes what was interrupted.

    Every run's config is built and checked before anything runs. Summarize with: stoptool report DIR.
    """
    from stoptool.sweep import emit, load_sweep, run_sweep, states
    from stoptool.train.fit import Interrupted

    o = checked(SweepOptions, overrides)
    plan = load_sweep(o.spec, o.out, o.set)
    if o.emit:
        _say(f"wrote {emit(plan, o.emit)} ({len(plan.runs)} runs)")
        return
    if o.dry_run:
        _print_columns(f"sweep {plan.label} in {plan.out} (dry run)", ("run", "state"),
                       [(r.name, str(s)) for r, s in zip(plan.runs, states(plan))], fold=True)
        return
    try:
        outcomes = run_sweep(plan, o.parallel, notify=_note)
    except Interrupted as stop:
        where = f" at step {stop.step} of {stop.total}" if stop.step is not None else ""
        err_console.print(f"interrupted{where}: checkpoint saved to {stop.checkpoint}; run the sweep again to resume",
                          highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(128 + stop.signum) from None
    _print_columns(f"sweep {plan.label} in {plan.out}", Outcome.COLUMNS, [o.row() for o in outcomes], fold=True)
    _say(f"summarize with: stoptool report {plan.out}")
    failed = [o for o in outcomes if o.error]
    if failed:
        err_console.print(f"error: {len(failed)} of {len(outcomes)} runs failed: " + "; ".join(f"{o.run.name}: {o.error}" for o in failed), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command(short_help="Mean ± sd per group of a sweep, paired differences.")
@user_errors
@with_options(declared(ReportOptions))
def report(overrides: dict | None = None):
    """Mean ± sd of every probe metric per group of a sweep's runs, and paired differences from a baseline.

    Runs without probe results (not started, partial, not probed, failed) are listed below the table, not counted.
    """
    from stoptool.report import check_outputs, make_report, plot, table_rows, write_outputs

    o = checked(ReportOptions, overrides)
    json_out, markdown_out = (Path(p) if p else None for p in (o.json, o.markdown))
    plot_out = check_outputs(json_out, markdown_out, Path(o.plot) if o.plot else None)
    result = make_report(o.sweep_dir, o.by, o.baseline)
    header, rows = table_rows(result)
    _print_columns(f"report {o.sweep_dir}: mean ± sd (probe metrics in %)", tuple(header), rows, fold=True)
    for name, state in result.excluded:
        _say(f"not included: {name} ({state})")
    write_outputs(result, json_out, markdown_out)
    if plot_out is not None:
        plot(result, plot_out)
    for path in (json_out, markdown_out, plot_out):
        if path is not None:
            _say(f"wrote {path}")


@app.command(short_help="DAVIS 2017 label propagation, J&F (Table 3).")
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


@app.command(short_help="Transfer-probe suites laid out as Table 4 (or 1).")
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


@viz_app.command("track", short_help="Propagated DAVIS masks over the frames.")
@user_errors
@with_options(declared(TrackFigureOptions))
def viz_track(overrides: dict | None = None):
    """Frames of a DAVIS sequence with the propagated masks over them, above the ground truth, each titled with its J&F."""
    from stoptool.viz.track import make_track

    o = checked(TrackFigureOptions, overrides)
    _report_figure("track", make_track(o.run_or_dir, o.seq, o.davis, o.frames, o.gif, o.out, o.dpi))


@app.command(short_help="Fine-tune an encoder end to end with a linear head (Table 5).")
@user_errors
@with_options(finetune_fields(), finetune_panels())
def finetune(
    config: str | None = config_option("finetune-in1k-1pct"),
    set_: list[str] = set_option("finetune", "--set lr=3e-5 --set by_size={h: {wd: 0.4}}"),
    resume: bool = typer.Option(True, "--resume/--no-resume", show_default=False, help="Resume from the run directory's latest checkpoint. (default: on)"),
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

    result = _train_launch("finetune", partial(run_finetune, cfg, resume=resume), quiet, cfg.precision, cfg.device)
    if result is None:
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
        if type(err).__name__ == "NoArgsIsHelpError":  # a group given no command: its help
            err.show()
        else:
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
