"""Fault scenarios that need a Ray of their own, run as a script in a subprocess so that the test
session's Ray (the `ray_cluster` fixture) is never touched.

    python -m helpers.faults two-nodes CHECKPOINT_DIR WORK_DIR     (from tests/, PYTHONPATH=repo:tests)

two-nodes: starts a local Ray cluster of two simulated nodes (ray.cluster_utils.Cluster: a head and
one worker node, 3 CPUs each), writes Parquet inputs under WORK_DIR/in and runs a job into
WORK_DIR/out with two model actors of 2 CPUs each, so that each node can hold exactly one of them:
the pool must span both nodes. Once the first unit is committed, every Ray worker process of the
second node (its model actor included, its raylet left alive) is killed with SIGKILL, as a node
losing its processes mid-job would be. The last line of stdout is JSON with what happened, for the
test to check: node count, the nodes the model actors ran on (from the GCS actor table), how many
worker processes were killed and when, actor restarts, the input ids and the run report.

Not a test by itself: tests/pipeline/test_actor_faults.py runs it and asserts on its output.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

CPUS_PER_NODE = 3
CPUS_PER_ACTOR = 2  # two actors cannot share a node of 3 CPUs, and one CPU per node stays for tasks


def _children(parent_pid: int) -> list[int]:
    """Pids of the direct children of `parent_pid` (from /proc: no psutil here)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing paren.
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent_pid:
                pids.append(int(entry.name))
    return pids


def _worker_pids(node) -> list[int]:
    """The Ray worker processes (tasks and actors) started by `node`'s raylet; not its agents (the
    raylet fate-shares with them: killing one takes the whole node down, which is another fault)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    pids = []
    for pid in _children(raylet):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        title = cmdline.split()[0] if cmdline.split() else ""
        if (title.startswith("ray::") or "default_worker.py" in cmdline) and not title.endswith("Agent"):
            pids.append(pid)
    return pids


def _model_actor_nodes() -> list[str]:
    """Node ids of the live model actors, from the GCS actor table."""
    import ray._private.state

    return sorted(a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                  if "InferActor" in a.get("ActorClassName", "") and a.get("State") == "ALIVE")


def _kill_after_first_commit(node, done_dir: Path, facts: dict, stop: threading.Event) -> None:
    """Once a unit is committed and both model actors are alive, SIGKILL the node's worker processes."""
    while not stop.is_set() and not (any(done_dir.glob("*.json")) and len(set(_model_actor_nodes())) == 2):
        time.sleep(0.1)
    if stop.is_set():
        return
    facts["actor_nodes"] = sorted(set(_model_actor_nodes()))  # where the pool ran just before the kill
    facts["second_node"] = node.node_id
    facts["units_done_at_kill"] = len(list(done_dir.glob("*.json")))
    killed = 0
    for pid in _worker_pids(node):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    facts["killed_workers"] = killed
    print(f"killed {killed} worker processes of the second node after {facts['units_done_at_kill']} units",
          file=sys.stderr, flush=True)


def two_nodes(checkpoint: str, work: Path) -> dict:
    import ray
    import ray._private.state
    from ray.cluster_utils import Cluster

    from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
    from pipeline.run import run_job
    from pipeline.spec import load_job

    rows, _ = mixed_rows(good=24)
    write_inputs(rows, str(work / "in"), files=2)
    out = work / "out"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CPUS_PER_NODE, "include_dashboard": False})
    second = cluster.add_node(num_cpus=CPUS_PER_NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        facts: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]]), "killed_workers": 0, "actor_nodes": []}
        spec = load_job(job_toml(checkpoint, f"{work}/in/*.parquet", str(out), rows_per_file=3),
                        ["resources.gpu_actors=2", f"resources.cpus_per_actor={CPUS_PER_ACTOR}",
                         "resources.rows_per_call=2"])
        stop = threading.Event()
        killer = threading.Thread(target=_kill_after_first_commit, args=(second, out / "_done", facts, stop),
                                  daemon=True)
        killer.start()
        try:
            report = run_job(spec)
        finally:
            stop.set()
            killer.join()
        facts["units_total"] = report["units_total"]
        facts["nodes_alive_after"] = len([n for n in ray.nodes() if n["Alive"]])
        actors = [a for a in ray._private.state.actors().values() if "InferActor" in a.get("ActorClassName", "")]
        facts["actor_restarts"] = sum(int(a.get("NumRestarts", 0)) for a in actors)
        facts["input_ids"] = [r["id"] for r in rows]
        facts["report"] = report
        return facts
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "two-nodes":
        print(__doc__, file=sys.stderr)
        return 2
    facts = two_nodes(argv[1], Path(argv[2]))
    print(json.dumps(facts, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
