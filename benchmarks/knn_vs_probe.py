"""Does the k-NN rank a run's checkpoints as the logistic probe does, and how far below it does
it read? For DINO's raw cosine and for the whitened k-NN stoptool uses by default.

    python benchmarks/knn_vs_probe.py [--seeds 0-7] [--root runs/knn_vs_probe] [--set KEY=VALUE ...]
    python benchmarks/knn_vs_probe.py --tables-only [--seeds 0-7] [--root ...]

For each seed, trains the default run (`stoptool pretrain --seed S --save-every 1
--eval-every 0`: a weight snapshot every epoch; without its online k-NN, which would
extract the same features again) unless its directory already holds a finished run (an
interrupted one is resumed), then for each encoder (the initial weights, rebuilt as `probe
--random-init --seed S` builds them, then epoch 1, 2, ... and `latest`) takes the probe's
features (`last`, the evaluation transform, the probe's precision, cached under ROOT/features)
and computes:

- `logreg`: `stoptool probe --method logreg`'s top-1 (the reference);
- the k-NN (cosine, k = 20, T = 0.07) on `raw` features (DINO's k-NN: `--knn-features raw`),
  `centred` ones (minus the bank's mean), `standardised` ones (minus the mean, over the bank's
  per-dimension std: as the logistic probe scales them) and `whitened` ones (the default of
  `probe` and of the online k-NN: PCA-whitened by the bank, `stoptool/probe/knn.py`); and the
  `online` knn_top1 the run logged at that step where it logged one (equal to the variant its
  online k-NN used: the check that the snapshots are the weights it evaluated);
- what the features look like: `mean_share`, the share of their energy (mean squared norm)
  in their mean, ||mu||^2 / mean ||x||^2; `pc1`, `pc3`, the share of the centred variance in
  the first and first three principal directions; RankMe of the raw and the centred features
  (of the 1,347 training images).

Printed as markdown: per variant, the mean first and last top-1, the change (mean ± sd over
seeds), in how many seeds the change has logreg's sign, Spearman's ρ with logreg over a seed's
checkpoints (mean over seeds), Spearman's ρ between the variant's and logreg's changes since
the initial weights pooled over every seed's later checkpoints, and the level gap to logreg
over every checkpoint; then per seed, and the mean of every quantity per checkpoint. One JSON
line per checkpoint goes to ROOT/results.jsonl; `--tables-only` prints the tables from it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from stoptool.config import build_config, parse_set
from stoptool.probe.config import ProbeConfig
from stoptool.probe.features import encoder_fingerprint
from stoptool.probe.knn import knn_probe
from stoptool.probe.logreg import logreg_probe
from stoptool.probe.run import get_features, load_encoder, open_splits
from stoptool.train.pretrain import pretrain
from stoptool.train.runtime import resolve_device, resolve_precision
from stoptool.train.watch import rankme

VARIANTS = ("raw", "centred", "standardised", "whitened")


def seeds_of(text: str) -> list[int]:
    """`0-7`, `0,3,5` or both: `1,4-7`."""
    seeds = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        seeds += list(range(int(a), int(b or a) + 1))
    return seeds


def train(seed: int, run_dir: Path, items: list[str]) -> dict:
    """The default run with this seed and a snapshot every epoch, unless it is there already (an
    interrupted one is resumed). Without its online k-NN unless `items` turn it on: the snapshots
    are the encoders it would evaluate, and `measure` takes their features anyway."""
    if (run_dir / "summary.json").is_file():
        return {"trained": False}
    resume = (run_dir / "latest.safetensors").is_file()
    values = {"eval_every": 0, **parse_set(items), "seed": seed, "save_every": 1, "out": str(run_dir)}
    cfg = build_config(str(run_dir / "config.yaml"), {"out": str(run_dir)}, resume=True) if resume \
        else build_config(None, values)
    start = time.perf_counter()
    result = pretrain(cfg, resume=resume)
    return {"trained": True, "train_seconds": round(time.perf_counter() - start, 1),
            "img_per_s": result.images_per_second, "final_loss": result.loss}


def online_rows(run_dir: Path) -> dict[int, float]:
    """step -> the knn_top1 the run logged there (none when it trained without its online k-NN)."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}


def checkpoints(run_dir: Path) -> list[tuple[str, Path | None, int]]:
    """(name, checkpoint or None for the initial weights, step): the initial weights, each
    epoch's snapshot, the last step's weights."""
    summary = json.loads((run_dir / "summary.json").read_text())
    per_epoch = summary["step"] // summary["epoch"]
    snaps = sorted(run_dir.glob("epoch*.safetensors"))
    out = [("init", None, 0)]
    out += [(p.stem, p, int(p.stem.removeprefix("epoch")) * per_epoch) for p in snaps]
    return out + [("latest", run_dir / "latest.safetensors", summary["step"])]


def knn_variants(x_train, y_train, x_test, y_test, classes: int, device) -> dict[str, float]:
    """top-1 (%) of the k-NN on each variant's features; `raw` and `whitened` are the probe's own."""
    def top1(a, b, features):
        return 100 * knn_probe(a, y_train, b, y_test, classes, features=features, device=device)["top1"]

    x64, t64 = x_train.astype(np.float64), x_test.astype(np.float64)
    mean, std = x64.mean(0), x64.std(0)
    std[std == 0] = 1
    return {"raw": top1(x_train, x_test, "raw"),
            "centred": top1(x64 - mean, t64 - mean, "raw"),
            "standardised": top1((x64 - mean) / std, (t64 - mean) / std, "raw"),
            "whitened": top1(x_train, x_test, "whitened")}


def spectrum(x_train: np.ndarray) -> dict[str, float]:
    """How the features spread their energy: in their mean, in the first principal directions."""
    x = torch.as_tensor(x_train, dtype=torch.float64)
    mu = x.mean(0)
    centred = x - mu
    var = torch.linalg.svdvals(centred) ** 2
    return {"mean_share": float(mu @ mu / (x * x).sum(1).mean()), "pc1": float(var[0] / var.sum()),
            "pc3": float(var[:3].sum() / var.sum()), "rankme_raw": rankme(x),
            "rankme_centred": rankme(centred)}


def measure(run_dir: Path, seed: int, cache: Path) -> list[dict]:
    run_cfg = build_config(str(run_dir / "config.yaml"))
    online = online_rows(run_dir)
    data = run_cfg.data
    train_set, test_set, _ = open_splits(ProbeConfig(dataset=data.dataset, data_root=data.data_root))
    classes = len(train_set.classes)
    rows = []
    for name, ckpt, step in checkpoints(run_dir):
        m = run_cfg.model
        cfg = ProbeConfig(ckpt=str(ckpt) if ckpt else None, random_init=ckpt is None,
                          arch=None if ckpt else m.arch, img_size=None if ckpt else m.img_size,
                          init=None if ckpt else m.init, seed=seed, cache_dir=str(cache)).validate()
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device, fp16=False)
        enc = load_encoder(cfg)
        digest, done = encoder_fingerprint(enc.net), []
        start = time.perf_counter()
        tr = get_features(enc, train_set, "train", cfg, device, precision, digest, None, done)
        te = get_features(enc, test_set, "test", cfg, device, precision, digest, None, done)
        row = {"seed": seed, "checkpoint": name, "step": step, "precision": precision,
               "extract_seconds": round(time.perf_counter() - start, 1),
               "online": 100 * online[step] if step in online else None}
        row["logreg"] = 100 * logreg_probe(tr.x, tr.y, te.x, te.y, classes, seed=cfg.seed)["top1"]
        row.update(knn_variants(tr.x, tr.y, te.x, te.y, classes, device))
        row.update(spectrum(tr.x))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per variant: Spearman's ρ with logreg over the checkpoints, and whether the change from
    the first to the last has logreg's sign."""
    ref = [r["logreg"] for r in rows]
    out = {"logreg": {"first": ref[0], "last": ref[-1], "change": ref[-1] - ref[0]}}
    for v in VARIANTS:
        vals = [r[v] for r in rows]
        change = vals[-1] - vals[0]
        out[v] = {"first": vals[0], "last": vals[-1], "change": change,
                  "spearman": float(spearmanr(vals, ref).statistic),
                  "same_sign": bool(np.sign(change) == np.sign(out["logreg"]["change"]))}
    return out


def pooled(per_rows: dict[int, list[dict]], v: str) -> float:
    """Spearman's ρ, over every seed's later checkpoints, between the variant's and logreg's
    changes since that seed's initial weights."""
    dv = [r[v] - rows[0][v] for rows in per_rows.values() for r in rows[1:]]
    dl = [r["logreg"] - rows[0]["logreg"] for rows in per_rows.values() for r in rows[1:]]
    return float(spearmanr(dv, dl).statistic)


def by_variant(per_seed: dict[int, dict], per_rows: dict[int, list[dict]]) -> list[str]:
    """One row per k-NN variant (and logreg): mean first and last, the change (mean ± sd over
    seeds), how often its sign is logreg's, Spearman's ρ with logreg, and the level gap to
    logreg (variant − logreg) over every checkpoint of every seed."""
    lines = ["| | first → last (mean) | change, mean ± sd | seeds with logreg's sign | mean ρ with logreg "
             "| pooled ρ of changes | gap to logreg: mean (min … max) |", "|---|---|---|---|---|---|---|"]
    n = len(per_seed)
    for v in ("logreg", *VARIANTS):
        changes = [s[v]["change"] for s in per_seed.values()]
        first = np.mean([s[v]["first"] for s in per_seed.values()])
        last = np.mean([s[v]["last"] for s in per_seed.values()])
        sd = np.std(changes, ddof=1) if n > 1 else 0.0
        cells = [f"{first:.2f} → {last:.2f}", f"{np.mean(changes):+.2f} ± {sd:.2f}"]
        if v == "logreg":
            cells += ["", "", "", ""]
        else:
            gaps = [r[v] - r["logreg"] for rows in per_rows.values() for r in rows]
            cells += [f"{sum(s[v]['same_sign'] for s in per_seed.values())}/{n}",
                      f"{np.nanmean([s[v]['spearman'] for s in per_seed.values()]):+.2f}",
                      f"{pooled(per_rows, v):+.2f}",
                      f"{np.mean(gaps):+.2f} ({min(gaps):+.2f} … {max(gaps):+.2f})"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def markdown(per_seed: dict[int, dict], per_rows: dict[int, list[dict]]) -> str:
    head = "| seed | logreg first → last | " + " | ".join(f"{v} first → last (ρ)" for v in VARIANTS) + " |"
    lines = [*by_variant(per_seed, per_rows), "", head, "|---|---|" + "---|" * len(VARIANTS)]
    for seed, s in per_seed.items():
        cells = [f"{s['logreg']['first']:.2f} → {s['logreg']['last']:.2f}"]
        for v in VARIANTS:
            mark = "" if s[v]["same_sign"] else ", sign ✗"
            cells.append(f"{s[v]['first']:.2f} → {s[v]['last']:.2f} ({s[v]['spearman']:+.2f}{mark})")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    n = len(per_seed)
    cells = [f"{np.mean([s['logreg']['first'] for s in per_seed.values()]):.2f} → "
             f"{np.mean([s['logreg']['last'] for s in per_seed.values()]):.2f}"]
    for v in VARIANTS:
        signs = sum(s[v]["same_sign"] for s in per_seed.values())
        cells.append(f"{np.mean([s[v]['first'] for s in per_seed.values()]):.2f} → "
                     f"{np.mean([s[v]['last'] for s in per_seed.values()]):.2f} "
                     f"(mean ρ {np.nanmean([s[v]['spearman'] for s in per_seed.values()]):+.2f}; "
                     f"sign {signs}/{n})")
    lines.append("| mean | " + " | ".join(cells) + " |")
    lines.append("| pooled ρ of changes since init | | "
                 + " | ".join(f"{pooled(per_rows, v):+.2f}" for v in VARIANTS) + " |")
    names = [r["checkpoint"] for r in next(iter(per_rows.values()))]
    lines += ["", "| checkpoint (mean of seeds) | logreg | " + " | ".join(VARIANTS)
              + " | online (logged) | mean_share | pc1 | pc3 | rankme raw | rankme centred |",
              "|---|" + "---|" * (len(VARIANTS) + 7)]
    for i, name in enumerate(names):
        avg = _averager([rows[i] for rows in per_rows.values()])
        lines.append(f"| {name} | {avg('logreg')} | " + " | ".join(avg(v) for v in VARIANTS)
                     + f" | {avg('online')} | {avg('mean_share', '.3f')} | {avg('pc1', '.3f')} | "
                     f"{avg('pc3', '.3f')} | {avg('rankme_raw')} | {avg('rankme_centred')} |")
    return "\n".join(lines)


def _averager(rows: list[dict]):
    def avg(key: str, fmt: str = ".2f") -> str:
        values = [r[key] for r in rows if r.get(key) is not None]
        return f"{np.mean(values):{fmt}}" if values else "-"
    return avg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0-7", help="0-7 or 0,3,5")
    ap.add_argument("--root", default="runs/knn_vs_probe")
    ap.add_argument("--set", action="append", default=[], dest="items", metavar="KEY=VALUE",
                    help="a pretrain setting beside the defaults (for every seed)")
    ap.add_argument("--tables-only", action="store_true",
                    help="print the tables from ROOT/results.jsonl (the seeds given), measuring nothing")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    per_seed, per_rows = {}, {}
    if args.tables_only:
        stored = {}  # the last measurement of each (seed, checkpoint)
        for r in map(json.loads, (root / "results.jsonl").read_text().splitlines()):
            stored[r["seed"], r["checkpoint"]] = r
        for seed in seeds_of(args.seeds):
            rows = sorted((r for (s, _), r in stored.items() if s == seed), key=lambda r: r["step"])
            if rows:
                per_rows[seed], per_seed[seed] = rows, summarise(rows)
        print(markdown(per_seed, per_rows))
        return
    for seed in seeds_of(args.seeds):
        run_dir = root / f"seed{seed}"
        trained = train(seed, run_dir, args.items)
        rows = measure(run_dir, seed, root / "features")
        for r in rows:
            r.update(trained)
        with open(root / "results.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        per_rows[seed], per_seed[seed] = rows, summarise(rows)
        print(json.dumps({"seed": seed, **per_seed[seed]}), flush=True)
    print(markdown(per_seed, per_rows))


if __name__ == "__main__":
    sys.exit(main())
