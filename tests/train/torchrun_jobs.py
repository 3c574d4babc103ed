"""Run by tests/train/test_distributed.py under torchrun (CPU processes, gloo): several jobs in
one launch, so that torchrun's start and each process's imports are paid once, not once a job.

The argument is a JSON file holding a list of jobs, run in order by every process:
  {"argv": ["pretrain", ...]}             a stoptool command line, as `python -m stoptool` runs it
  {"grads": [OUT_DIR, MODES]}             tests/train/ddp_grads.py's main
  {..., "copy": [[SRC, DST], ...]}        files process 0 copies once the job has ended
Job i's output goes to SPEC.i.rankR.out and .err beside the spec, its exit code to
SPEC.i.rankR.code.

The process group is joined by the first job and kept between jobs: gloo refuses, at times, a
group set up again on the port of one just torn down. Every job but the last leaves the group
standing where it would tear it down (after its barrier); the last tears it down as it always does.
"""

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import ddp_grads  # noqa: E402

from stoptool.cli import main as stoptool_main  # noqa: E402


def run_job(job: dict) -> int:
    if "argv" in job:
        sys.argv = ["stoptool", *job["argv"]]
        try:
            stoptool_main()
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else 0
        return 0
    ddp_grads.main(*job["grads"])
    return 0


def main(spec: str) -> None:
    jobs = json.loads(Path(spec).read_text())
    rank = os.environ["RANK"]
    teardown = dist.destroy_process_group
    for i, job in enumerate(jobs):
        last = i == len(jobs) - 1
        dist.destroy_process_group = teardown if last else (lambda *args, **kwargs: None)
        stem = f"{spec}.{i}.rank{rank}"
        with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run_job(job)
        Path(f"{stem}.code").write_text(str(code))
        if rank == "0":
            for src, dst in job.get("copy", []):
                shutil.copyfile(src, dst)


if __name__ == "__main__":
    main(sys.argv[1])
