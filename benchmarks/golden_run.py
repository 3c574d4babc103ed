"""Fixed tiny fp32 runs whose every tensor and per-step loss pin the engine's behaviour.

    python benchmarks/golden_run.py --record   # add this machine's entry to the fixture
    python benchmarks/golden_run.py            # print this machine's figures as JSON

`tests/train/test_golden.py` reruns the same runs and compares them with
`tests/fixtures/golden/engine.json`: bit for bit on a machine whose fingerprint (torch version
and CPU kernels) has an entry, within a small tolerance elsewhere (fp32 kernels sum in another
order on another CPU). The entries were recorded before the engine was restructured, so a
refactor that moves a single bit shows up here.

The legacy run directory `tests/fixtures/golden/legacy-run/` (written by `--legacy DIR`) is a
run stopped at step 3 with the ViT-T shape shrunk to one 48-wide block (a real ViT-T
checkpoint is 90 MB); the test shrinks it the same way, resumes it and compares with the
uninterrupted run's tensors recorded here.
"""

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from stoptool.config import build_config
from stoptool.io.checkpoint import load_checkpoint
from stoptool.models import archs
from stoptool.train.pretrain import pretrain

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "engine.json"

RUNS = {
    # the default path: digits, StoP noise on the masked tokens, no clipping
    "stop": {},
    # every optional term of the step: the l1 penalty on A, clipping, fixed covariance, both
    "penalty-clip": {"a_l1": 0.01, "clip_grad": 0.5, "cov": "fixed", "noise_on": "both", "sigma": 0.5},
}
BASE = {
    "arch": "vit_t2", "img_size": 16, "pred_width": 48, "pred_depth": 1, "batch_size": 16,
    "epochs": 1, "steps": 6, "warmup": 0.5, "precision": "fp32", "device": "cpu", "workers": 0,
    "log_every": 1, "save_every": 1, "seed": 3, "dataset": "digits",
    "eval_every": 0,  # the online k-NN reads the weights and changes none of them
    "interpolation": "bicubic",  # the crops' resampling when the runs were recorded
}
SHRUNK = archs.ArchSpec(48, 1, 3)  # the legacy run's ViT-T: one 48-wide block, 3 heads


def fingerprint() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return f"torch {torch.__version__.split('+')[0]} | {cap}{' amx' if amx else ''}"


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def figures(run_dir: Path) -> dict:
    """Per-step losses (exact, as float.hex) and every tensor's sha256 and sum."""
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # not the evaluation of the initial weights, nor alarms
    tensors = load_checkpoint(run_dir / "latest.safetensors").tensors
    return {
        "losses": [float(r["loss"]).hex() for r in rows],
        "sha256": {k: digest(v) for k, v in sorted(tensors.items())},
        "sums": {k: v.double().sum().item() for k, v in sorted(tensors.items()) if v.is_floating_point()},
    }


def run(name: str, out: Path, **extra) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same kernels' split whatever the core count
    try:
        pretrain(build_config(None, {**BASE, **RUNS[name], "out": str(out), **extra}))
    finally:
        torch.set_num_threads(threads)
    return figures(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="write this machine's entry into the fixture")
    ap.add_argument("--legacy", type=Path, help="also write the legacy run directory here")
    args = ap.parse_args()
    entry = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            entry[name] = run(name, Path(tmp) / name)
        saved = archs.ARCHS["t"]
        archs.ARCHS["t"] = SHRUNK
        try:
            entry["legacy-full"] = run("stop", Path(tmp) / "legacy-full")
            if args.legacy:
                if args.legacy.exists():
                    shutil.rmtree(args.legacy)
                run("stop", args.legacy, steps=3)
        finally:
            archs.ARCHS["t"] = saved
    if not args.record:
        json.dump(entry, sys.stdout, indent=1)
        return
    data = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    data[fingerprint()] = entry
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"recorded {fingerprint()} in {FIXTURE}: {', '.join(entry)}; "
          f"losses {[math.nan if 0 else float.fromhex(x) for x in entry['stop']['losses']]}")


if __name__ == "__main__":
    main()
