"""Calibrate the demo: pretrain one configuration, then probe it beside random init.

    python benchmarks/calibrate_demo.py --set pred_width=192 --set pred_depth=2 --name p2x192

Each `--set key=value` overrides a `PretrainConfig` default (values are YAML: `0.3,1.0` is
written `[0.3,1.0]`). Prints, and appends to `--log` as one JSON line: the configuration, the
training time and img/s, the final loss, and logistic-probe top-1 (`last` features) on the
data set it trained on (digits by default; `--set dataset=count` for the counting set) of the
trained target encoder, of the context encoder, and of a random-init encoder of the same arch
and image size. `--no-train RUN_DIR` only probes an existing run.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from stoptool.config import build_config
from stoptool.probe.run import ProbeConfig, run_probe
from stoptool.train.pretrain import pretrain


def probe(**kw) -> float:
    report = run_probe(ProbeConfig(method=kw.pop("method", "logreg"), out=os.devnull, **kw))
    return report.rows[0]["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default=None)
    ap.add_argument("--root", default="runs/calibrate")
    ap.add_argument("--log", default="runs/calibrate/results.jsonl")
    ap.add_argument("--no-train", metavar="RUN_DIR", default=None)
    ap.add_argument("--methods", default="logreg", help="comma-separated probe methods")
    args = ap.parse_args()

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    name = args.name or ("-".join(f"{k}{v}" for k, v in overrides.items()) or "defaults")
    run_dir = Path(args.no_train or Path(args.root) / name)
    overrides["out"] = str(run_dir)
    # with --no-train, the run's own settings (data set, arch, seed) come first, then any --set
    cfg = build_config(str(run_dir / "config.yaml") if args.no_train else None, overrides)
    row = {"name": name, "overrides": {k: v for k, v in overrides.items() if k != "out"}}
    if args.no_train is None:
        start = time.perf_counter()
        result = pretrain(cfg, resume=False)
        row.update(train_seconds=round(time.perf_counter() - start, 1),
                   img_per_s=result.images_per_second, steps=result.step,
                   final_loss=result.loss)
    ckpt = str(run_dir / "latest.safetensors")
    probe_on = {"dataset": cfg.data.dataset, "data_root": cfg.data.data_root}
    m = cfg.model
    for method in args.methods.split(","):
        t = time.perf_counter()
        row[f"{method}_target"] = probe(ckpt=ckpt, method=method, **probe_on)
        row[f"{method}_context"] = probe(ckpt=ckpt, method=method, which="context", **probe_on)
        row[f"{method}_random"] = probe(random_init=True, arch=m.arch, img_size=m.img_size, init=m.init,
                                        seed=cfg.runtime.seed, method=method, **probe_on)
        row[f"{method}_delta"] = round(row[f"{method}_target"] - row[f"{method}_random"], 4)
        row[f"{method}_seconds"] = round(time.perf_counter() - t, 1)
    line = json.dumps(row)
    print(line, flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
