"""A driver that dies on purpose at one step of one commit, as a killed driver would, for tests.

    python -m helpers.crash_driver STEP:N JOB.toml RAY_ADDRESS     (cwd: the repository, tests/ on PYTHONPATH)

runs the job like `t5g2 run JOB.toml --address RAY_ADDRESS`, with a commit-step callback
(pipeline.run.RunHooks.on_commit_step) that exits the process abruptly (os._exit(CRASH_EXIT_CODE),
no cleanup) at STEP ("before-publish": the unit's part file not yet written, "after-publish": part
file published, no done-marker yet, "after-done": marker written) of the N-th commit of the run.
The resume and commit-fault tests run it and then check what the rerun does.
"""

from __future__ import annotations

import os
import sys

from pipeline.commit import COMMIT_STEPS
from pipeline.run import RunHooks, run_job
from pipeline.spec import load_job

CRASH_EXIT_CODE = 75


def crash_at(step: str, n: int):
    if step not in COMMIT_STEPS or n < 1:
        raise ValueError(f"crash point {step}:{n}: STEP must be one of {', '.join(COMMIT_STEPS)} and N >= 1")

    def on_step(at: str, commit: int) -> None:
        if (at, commit) == (step, n):
            print(f"crash_driver: exiting abruptly at {step}:{n}", flush=True)
            os._exit(CRASH_EXIT_CODE)

    return on_step


def main(argv: list[str]) -> int:
    point, job, address = argv
    step, _, n = point.partition(":")
    report = run_job(load_job(job), address=address, hooks=RunHooks(on_commit_step=crash_at(step, int(n))))
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
