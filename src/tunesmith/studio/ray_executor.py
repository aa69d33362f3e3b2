"""The studio's jobs on a Ray cluster (`tunesmith studio --executor ray --ray-address ADDRESS`, docs/scaling.md).

Ray's job-submission API is the whole of it (`ray.job_submission.JobSubmissionClient`, what LLaMA-Factory, axolotl and
ms-swift run on): a job's command -- the same `tunesmith train ...` the local executor runs -- is submitted as a Ray
job whose submission id is the job's id (`ftjob-...`; `ftjob-...-2`, `-3` for the attempts after a pause or a
failure, as Ray keeps an id for good), with the CPUs, GPUs and memory it asks for (`tunesmith.resources`, else the
studio's defaults). Ray picks the node; the studio then follows the job by its status (PENDING, RUNNING, SUCCEEDED,
FAILED, STOPPED) and reads everything else -- metrics, events, checkpoints, the model -- from the run folder, which is
on the studio home, on storage every node mounts at the same path. Nothing is our own here but the mapping.

A stop is Ray's `stop_job`: Ray sends SIGTERM to the command (the CLI finishes its step, writes a checkpoint and exits)
and SIGKILLs it only after RAY_JOB_STOP_WAIT_TIME_S, which each job sets to the studio's own STOP_WAIT_SECONDS (Ray's
default, 3 s, is too short for a checkpoint). A studio that stops leaves its Ray jobs running; started again, it finds
each by the submission id kept in HOME/jobs/<job id>.ray and follows it on. A job whose node dies is FAILED by Ray
("the actor's node died"); the studio fails it with a message naming the node, and a resume continues it from its
newest checkpoint on whichever node Ray picks.

One job on several machines (`tunesmith.resources: {"nodes": N, "processes": M}`) is still one Ray job: its entrypoint
is this module's `main` (`python -m tunesmith.studio.ray_executor --nodes N --processes M -- tunesmith train ...`),
which reserves N bundles of M processes' resources in a STRICT_SPREAD placement group (one per node), starts one
actor on each and has each run the project's own torchrun path: `tunesmith train ... --nproc M --nnodes N
--node-rank i --master-addr <node 0> --master-port <free there>` (DDP / FSDP / DeepSpeed as the config says). A stop
reaches it as SIGTERM and is passed on to every node's command; the ranks agree on the step to stop after
(train/loop.py) and rank 0 writes the checkpoint and the run folder, as on one machine.

Only this module imports ray (`tunesmith[ray]`), and only when a studio is started with `--executor ray`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from tunesmith.errors import TunesmithError
from tunesmith.studio.jobs import DEFAULT_CONFIG, STOP_WAIT_SECONDS, Ended, _die_with_parent

UNREACHABLE_EVENT_S = 30  # a cluster that has not answered this long gets an event on each of its jobs (once)


@dataclass
class RayJob:
    """The handle of one attempt of a studio job on the cluster."""
    job_id: str
    submission_id: str
    announced: bool = False                        # its node was named in an event
    news: list = field(default_factory=list)       # events for the job, said on the next follow
    silent_since: Optional[float] = None           # when the cluster stopped answering about it


class RayExecutor:
    """Jobs as Ray jobs on the cluster at `address` (the dashboard's http://HOST:8265, or what `ray job submit`
    takes); each asks `cpus`/`gpus`/`memory_gb` of a node unless its request says otherwise."""
    name = "ray"
    detach_on_shutdown = True  # a stopping studio leaves its Ray jobs running; it follows them again when it starts

    def __init__(self, address: str, cpus: float = 1, gpus: float = 0, memory_gb: Optional[float] = None,
                 program: str = "tunesmith", python: str = "python"):
        self.address, self.program, self.python = address, program, python  # as the nodes' PATH finds them
        self.defaults = {"cpus": cpus, "gpus": gpus, "memory_gb": memory_gb}
        self.client = None

    def attach(self, home: Path) -> None:
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise TunesmithError("--executor ray needs Ray's job-submission client: pip install 'tunesmith[ray]'") from None
        self.home = Path(home)
        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as e:
            raise TunesmithError(f"--ray-address {self.address}: no Ray cluster's job server answers there "
                                 f"({type(e).__name__}: {str(e)[:200]})") from None
        # the studio's default config, where every node reads it (a node's own install may live elsewhere)
        self.config_copy = self.home / "jobs" / "studio-default.yaml"
        tmp = self.config_copy.with_suffix(".tmp")
        shutil.copyfile(DEFAULT_CONFIG, tmp)
        os.replace(tmp, self.config_copy)

    # ---- the executor's interface (jobs.LocalExecutor's)
    def launch(self, job_id: str, args: list[str], env: dict, resources: dict) -> RayJob:
        record = self._record(job_id)
        attempt = record.get("attempt", 0) + 1
        submission_id = job_id if attempt == 1 else f"{job_id}-{attempt}"
        _write_json(self._record_path(job_id), {"submission_id": submission_id, "attempt": attempt,
                                                "address": self.address})
        args = [str(self.config_copy) if a == str(DEFAULT_CONFIG) else a for a in args]
        want = {**self.defaults, "nodes": 1, "processes": 1, **{k: v for k, v in resources.items() if v is not None}}
        command = [self.program, *args]
        nodes, procs = int(want["nodes"]), int(want["processes"])
        one = nodes * procs == 1
        if not one:  # the launcher (main below) places the nodes' commands; it needs no CPU of its own
            command = [self.python, "-m", "tunesmith.studio.ray_executor", "--name", submission_id, "--nodes", str(nodes),
                       "--processes",
                       str(procs), "--cpus", f"{want['cpus']:g}", "--gpus", f"{want['gpus']:g}",
                       "--memory-gb", f"{want['memory_gb'] or 0:g}", "--", *command]
        entrypoint = f"cd {shlex.quote(str(self.home))} && exec {shlex.join(command)}"
        self.client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id, metadata={"ftjob": job_id},
            entrypoint_num_cpus=(want["cpus"] or None) if one else None,
            entrypoint_num_gpus=(want["gpus"] or None) if one else None,
            entrypoint_memory=int(want["memory_gb"] * (1 << 30)) if want["memory_gb"] and one else None,
            runtime_env={"env_vars": {**env, "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_SECONDS)}})
        job = RayJob(job_id, submission_id)
        asked = ", ".join(f"{k} {v:g}" for k, v in want.items() if v and not (k in ("nodes", "processes") and one))
        job.news.append(f"Submitted to the Ray cluster as Ray job {submission_id}" + (f" ({asked})" if asked else ""))
        return job

    def ended(self, job: RayJob) -> Optional[Ended]:
        try:
            info = self.client.get_job_info(job.submission_id)
        except Exception as e:
            if _not_found(e):  # the cluster forgot it (it was restarted): the command is gone
                return Ended(None, f"the Ray cluster no longer knows Ray job {job.submission_id} (was it restarted?); "
                                   f"resume the job to continue from its newest checkpoint")
            now = time.time()
            job.silent_since = job.silent_since or now
            if now - job.silent_since > UNREACHABLE_EVENT_S and job.silent_since > 0:
                job.news.append(f"The Ray cluster has not answered for {UNREACHABLE_EVENT_S} s ({type(e).__name__}); "
                                f"the studio keeps asking")
                job.silent_since = -1.0  # said once
            return None
        if job.silent_since is not None:
            job.silent_since = None
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        if status == "RUNNING" and not job.announced:
            job.announced = True
            job.news.append(f"Running on Ray node {_node_label(info)}")
        if status in ("PENDING", "RUNNING"):
            return None
        self._save_logs(job)
        if status == "SUCCEEDED":
            return Ended(0)
        if status == "STOPPED":  # by the studio (its stop says so), or by someone else's `ray job stop`
            return Ended(130, f"Ray job {job.submission_id} was stopped outside the studio; resume the job to continue "
                              f"from its newest checkpoint")
        if info.driver_exit_code is not None:  # the command itself failed: its log says why
            return Ended(int(info.driver_exit_code))
        return Ended(None, _failure_message(job.submission_id, info))

    def news(self, job: RayJob) -> list[str]:
        out, job.news = job.news, []
        return out

    def stop(self, job: RayJob) -> None:
        try:
            self.client.stop_job(job.submission_id)  # SIGTERM to the command; SIGKILL after RAY_JOB_STOP_WAIT_TIME_S
        except Exception as e:
            if not _not_found(e):
                raise

    def kill(self, job: RayJob) -> None:
        self.stop(job)  # Ray kills it itself once RAY_JOB_STOP_WAIT_TIME_S has passed

    def wait(self, job: RayJob, timeout: float) -> None:
        return None

    def find(self, job_id: str) -> Optional[RayJob]:
        """The job's newest attempt on the cluster, as a restarted studio finds it again (None: there is none)."""
        submission_id = self._record(job_id).get("submission_id")
        if not submission_id:
            return None
        try:
            self.client.get_job_info(submission_id)
        except Exception as e:
            if _not_found(e):
                return None
            raise
        return RayJob(job_id, submission_id)

    # ---- helpers
    def _record_path(self, job_id: str) -> Path:
        return self.home / "jobs" / f"{job_id}.ray"

    def _record(self, job_id: str) -> dict:
        try:
            return json.loads(self._record_path(job_id).read_text())
        except (OSError, ValueError):
            return {}

    def _save_logs(self, job: RayJob) -> None:
        """The attempt's output (Ray keeps it on the node that ran it) into HOME/jobs/<job id>.log, as the local
        executor writes it there; nothing when that node is gone."""
        try:
            text = self.client.get_job_logs(job.submission_id)
        except Exception:
            return
        with open(self.home / "jobs" / f"{job.job_id}.log", "a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") or not text else text + "\n")


def _not_found(e: Exception) -> bool:
    return "status code 404" in str(e) or "does not exist" in str(e)


def _node_label(info) -> str:
    host = urlparse(info.driver_agent_http_address or "").hostname
    node = (info.driver_node_id or "")[:12]
    return f"{host} (node id {node})" if host and node else host or node or "(unknown)"


def _failure_message(submission_id: str, info) -> str:
    """Why Ray failed a job whose command did not exit by itself: the node that died, named, or Ray's first line."""
    text = info.message or ""
    if "node" in text.lower() and ("died" in text or "dead" in text):
        node = re.search(r"Node Id: ([0-9a-f]+)", text)
        ip = re.search(r"\bip: ([0-9A-Fa-f.:]+)", text)
        name = " ".join(x for x in (ip.group(1) if ip else _node_label(info),
                                    f"(node id {node.group(1)[:12]})" if node else "") if x)
        return (f"the Ray node {name} running this job died (Ray job {submission_id}); resume the job to continue "
                f"from its newest checkpoint")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "no reason given")
    return f"Ray failed Ray job {submission_id}: {first[:300]}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------- one job on several nodes (runs inside the Ray job)

class _NodeRank:
    """One node's part of a multi-node job: its `tunesmith train --nproc M --nnodes N --node-rank i` process tree."""

    def __init__(self):
        self.proc = None

    def where(self) -> tuple:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, command: list, cwd: str, log: str) -> int:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)  # never left training once the actor is gone
        return self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)


def main(argv=None) -> int:
    """The entrypoint of a job of N nodes x M processes (see the module's docstring)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    p = argparse.ArgumentParser(prog="python -m tunesmith.studio.ray_executor")
    p.add_argument("--name", default="job")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--cpus", type=float, default=1)
    p.add_argument("--gpus", type=float, default=0)
    p.add_argument("--memory-gb", type=float, default=0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # Ray's stop_job: passed on to every node below
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    bundle = {k: v for k, v in {"CPU": a.cpus * a.processes, "GPU": a.gpus * a.processes,
                                "memory": a.memory_gb * a.processes * (1 << 30)}.items() if v}
    group = placement_group([bundle] * a.nodes, strategy="STRICT_SPREAD")
    print(f"waiting for {a.nodes} nodes with {bundle} each", flush=True)
    while not stop:
        ready, _ = ray.wait([group.ready()], timeout=1.0)
        if ready:
            break
    if stop:
        return 130
    rank = ray.remote(_NodeRank)
    ranks = [rank.options(num_cpus=0, max_concurrency=2, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=i)).remote() for i in range(a.nodes)]
    addr, port = ray.get(ranks[0].where.remote())
    print(f"{a.nodes} nodes x {a.processes} processes; node 0 at {addr}:{port}", flush=True)
    logs = [os.path.abspath(os.path.join("jobs", f"{a.name}-node{i}.log")) for i in range(a.nodes)]
    runs = [r.run.remote([*command, "--nproc", str(a.processes), "--nnodes", str(a.nodes), "--node-rank", str(i),
                          "--master-addr", addr, "--master-port", str(port)], os.getcwd(), logs[i])
            for i, r in enumerate(ranks)]
    stopped = False
    while True:
        done, _ = ray.wait(runs, num_returns=len(runs), timeout=0.5)
        if len(done) == len(runs):
            break
        if stop and not stopped:
            stopped = True
            ray.get([r.stop.remote() for r in ranks])
    codes = ray.get(runs)
    for i, code in enumerate(codes):  # the CLI's `error: ...` of a node that failed, for the studio's message
        if code:
            lines = [ln for ln in open(logs[i], encoding="utf-8", errors="replace").read().splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("error: ")]
            print(errors[-1] if errors else f"error: node {i}'s command exited with code {code}: "
                  f"{(lines or [''])[-1][-300:]}", flush=True)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
