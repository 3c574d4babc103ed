"""The `stoptool` command line: parse, validate, call, report. No method code lives here."""

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from stoptool.errors import UserError

app = typer.Typer(
    help="StoP (stochastic positional embeddings) on I-JEPA: pretrain ViTs, probe them, draw the paper's figures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _pair(text: Optional[str], flag: str) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes two numbers as MIN,MAX, got '{text}'") from None
    return lo, hi


def print_table(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(str(k), str(v))
    console.print(table)


@app.command()
@user_errors
def pretrain(
    arch: Optional[str] = typer.Option(None, help="Encoder: vit_{t,s,b,l,h,g}<patch>, e.g. vit_b16, vit_t4. [default: vit_t4]"),
    sigma: Optional[float] = typer.Option(None, help="StoP noise standard deviation σ; 0 is plain I-JEPA. [default: 0.25]"),
    dataset: Optional[str] = typer.Option(None, help="'digits' (bundled) or a path to an ImageFolder tree. [default: digits]"),
    config: Optional[str] = typer.Option(None, "--config", help="A preset name (e.g. stop-vitb16-in1k) or a YAML file; flags override it."),
    img_size: Optional[int] = typer.Option(None, help="Image side in pixels; a multiple of the patch size. [default: 32]"),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size. [default: 128]"),
    epochs: Optional[int] = typer.Option(None, help="Epochs (schedules span ipe_scale × epochs). [default: 40]"),
    steps: Optional[int] = typer.Option(None, help="Stop after this many steps in total (schedules unchanged)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate after warmup."),
    start_lr: Optional[float] = typer.Option(None, help="Learning rate at step 0."),
    final_lr: Optional[float] = typer.Option(None, help="Learning rate at the end of the cosine."),
    warmup: Optional[float] = typer.Option(None, help="Warmup length in epochs."),
    wd: Optional[float] = typer.Option(None, help="Weight decay at the start (cosine to --final-wd)."),
    final_wd: Optional[float] = typer.Option(None, help="Weight decay at the end."),
    ipe_scale: Optional[float] = typer.Option(None, help="Schedules run over ipe_scale × epochs."),
    pred_depth: Optional[int] = typer.Option(None, help="Predictor depth. [default: 6]"),
    pred_width: Optional[int] = typer.Option(None, help="Predictor width d_p. [default: 384]"),
    pred_pos: Optional[str] = typer.Option(None, help="Predictor positions: sincos | learned (paper Table 6)."),
    noise_on: Optional[str] = typer.Option(None, help="Where the noise goes: masked | context | both (Table 7)."),
    cov: Optional[str] = typer.Option(None, help="Noise covariance: learned (σ²AAᵀ) | fixed (σ²I in predictor width)."),
    a_l1: Optional[float] = typer.Option(None, help="λ of an l1 penalty λ‖A‖₁ on the predictor's input projection."),
    mask_mode: Optional[str] = typer.Option(None, help="multiblock (I-JEPA) | random (MAE-style)."),
    num_targets: Optional[int] = typer.Option(None, help="Target blocks per image. [default: 4]"),
    target_scale: Optional[str] = typer.Option(None, help="Target block scale MIN,MAX. [default: 0.15,0.2]"),
    target_aspect: Optional[str] = typer.Option(None, help="Target block aspect MIN,MAX. [default: 0.75,1.5]"),
    context_scale: Optional[str] = typer.Option(None, help="Context block scale MIN,MAX. [default: 0.85,1.0]"),
    min_keep: Optional[int] = typer.Option(None, help="A mask keeps more than this many patches. [default: 10 at 14×14, scaled]"),
    crop_scale: Optional[str] = typer.Option(None, help="Random-resized-crop area MIN,MAX. [default: 0.3,1.0]"),
    hflip: Optional[float] = typer.Option(None, help="Horizontal flip probability."),
    blur: Optional[float] = typer.Option(None, help="Gaussian blur probability."),
    gray: Optional[float] = typer.Option(None, help="Grayscale probability."),
    subset: Optional[str] = typer.Option(None, help="File of image paths (one per line) to keep from an ImageFolder."),
    out: Optional[str] = typer.Option(None, help="Run directory. [default: runs/<data>-<arch>-sigma<σ>]"),
    seed: Optional[int] = typer.Option(None, help="Random seed. [default: 0]"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N. [default: auto]"),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp16 | fp32 (auto: bf16 where fast). [default: auto]"),
    workers: Optional[int] = typer.Option(None, help="Data loader workers. [default: auto]"),
    save_every: Optional[int] = typer.Option(None, help="Write latest and a snapshot every N epochs. [default: 10]"),
    log_every: Optional[int] = typer.Option(None, help="Log metrics every N steps. [default: 10]"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="Use torch.compile."),
    grad_checkpoint: Optional[bool] = typer.Option(None, "--grad-checkpoint/--no-grad-checkpoint", help="Recompute activations to save memory."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from the run directory's latest checkpoint."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as YAML and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Pretrain an encoder with I-JEPA + StoP (σ > 0) or plain I-JEPA (σ = 0)."""
    overrides = {
        k: v for k, v in locals().items()
        if k not in ("config", "resume", "print_config", "quiet") and v is not None
    }
    from stoptool.config import build_config

    for key in ("target_scale", "target_aspect", "context_scale", "crop_scale"):
        if key in overrides:
            overrides[key] = _pair(overrides[key], "--" + key.replace("_", "-"))
    cfg = build_config(config, overrides)
    if print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    from stoptool.train.pretrain import Interrupted, pretrain as run_pretrain

    with _ProgressBar(quiet) as bar:
        try:
            result = run_pretrain(cfg, resume=resume, progress=bar.update)
        except Interrupted as stop:
            bar.stop()
            err_console.print(f"interrupted: checkpoint saved to {stop.checkpoint}")
            raise typer.Exit(128 + stop.signum) from None
    if result.already_done:
        console.print(f"run in {result.run_dir} is already complete at step {result.step}; "
                      "use --steps/--epochs to go further or --no-resume to start over")
        return
    print_table("pretrain", {
        "run directory": result.run_dir,
        "checkpoint": result.checkpoint,
        "steps": result.step,
        "epochs": result.epoch,
        "final loss": f"{result.loss:.5f}" if result.loss is not None else "-",
        "seconds": f"{result.seconds:.1f}",
        "img/s": result.images_per_second,
        "metrics": result.run_dir / "metrics.jsonl",
        "summary": result.run_dir / "summary.json",
    })


class _ProgressBar:
    """A rich progress bar fed by the training loop's progress callback."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.fields = {"loss": "-", "lr": "-", "ips": "-", "epoch": "-"}

    def __enter__(self):
        if not self.quiet:
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
                TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[ips]} img/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=err_console,
            )
            self.progress.start()
        return self

    def update(self, step: int, total: int, row: dict | None) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("pretrain", total=total, completed=step, **self.fields)
        if row is not None:
            self.fields = {
                "loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}",
                "ips": f"{row['img_per_s']:.0f}", "epoch": f"{row['epoch']:.1f}",
            }
        self.progress.update(self.task, completed=step, **self.fields)

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __exit__(self, *exc):
        self.stop()


@app.command()
@user_errors
def info(ckpt: Path = typer.Argument(..., help="A stoptool checkpoint (.safetensors)."),
         json_out: bool = typer.Option(False, "--json", help="Print the metadata as JSON.")):
    """Show what a checkpoint holds: arch, σ, step, data, config, parameter counts."""
    from stoptool.io.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    meta = ck.meta
    if json_out:
        sys.stdout.write(json.dumps(meta, indent=2) + "\n")
        return
    rows = {"file": ckpt, "kind": meta.get("kind", "?"), "size": f"{ckpt.stat().st_size / 2**20:.1f} MiB"}
    for key in ("arch", "img_size", "patch", "sigma", "pred_depth", "pred_width", "pred_pos",
                "noise_on", "cov", "a_l1", "step", "epoch", "precision", "source", "stoptool_version"):
        if key in meta:
            rows[key] = meta[key]
    if "data" in meta:
        rows["data"] = ", ".join(f"{k}={v}" for k, v in meta["data"].items())
    for part in ("encoder", "target_encoder", "predictor"):
        if ck.has(part):
            n = sum(t.numel() for t in ck.part(part).values())
            rows[f"{part} params"] = f"{n:,}"
    print_table(f"checkpoint {ckpt.name}", rows)
    if "config" in meta:
        console.print("[bold]config[/]")
        console.print(yaml.safe_dump(meta["config"], sort_keys=False), highlight=False, markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
