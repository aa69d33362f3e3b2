"""`tunesmith studio --executor ray` against a real Ray cluster started here (Ray's own `cluster_utils.Cluster`: a head
that runs no jobs, and two worker nodes of one CPU each), driven by the official `openai` SDK: two jobs at once on two
nodes while the studio is killed (SIGKILL) and started again, pause / resume / cancel with checkpoints, and a worker
node killed mid-job. The studio runs as `tunesmith studio`, a process of its own, so it can be killed."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import write_jsonl

pytest.importorskip("ray.job_submission")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.job_submission import JobSubmissionClient  # noqa: E402

KEY = "ray-test-key"
FAST = ["eval.samples=1", "eval.max_new_tokens=4", "eval.max_examples=4", "train.lr=1e-2"]
LONG = FAST + ["train.max_steps=3000", "train.save_every_steps=5"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (the job server, no CPUs for jobs) and two 1-CPU worker nodes, small object stores; shut down after."""
    port = free_port()
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `tunesmith` on nodes
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_memory_monitor_refresh_ms": "0",  # the machine is shared: Ray must not kill jobs for others' memory
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",  # a dead node: ~3 s
           "TUNESMITH_DATA_CACHE": str(tmp_path_factory.mktemp("ray-data-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the nodes' processes inherit it
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "object_store_memory": 80 << 20})
        workers = [c.add_node(num_cpus=1, object_store_memory=80 << 20) for _ in range(2)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    c.address_url = f"http://127.0.0.1:{port}"
    c.workers = workers
    deadline = time.time() + 60
    while True:
        try:
            c.jobs = JobSubmissionClient(c.address_url)
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)
    yield c
    c.shutdown()


class Studio:
    """`tunesmith studio --executor ray` as a process of its own."""

    def __init__(self, home, cluster, models_dir):
        self.home, self.cluster, self.models_dir = home, cluster, models_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        self.log = open(self.home.parent / f"{self.home.name}-studio.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunesmith.cli.main", "studio", "--home", str(self.home), "--port", str(self.port),
             "--api-key", KEY, "--models", str(self.models_dir), "--executor", "ray",
             "--ray-address", self.cluster.address_url],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, (self.home.parent / f"{self.home.name}-studio.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the studio did not start"
            time.sleep(0.5)

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=2, timeout=60)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def studio(tmp_path, cluster, tiny_model_dir):
    s = Studio(tmp_path / "home", cluster, tiny_model_dir.parent)
    yield s
    s.stop()


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(n)]


def upload(client, path):
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune")


def wait(client, job_id, until, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s; events "
                         f"{[e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=12)]}")


def steps_of(client, job_id):
    return [e.data["step"] for e in client.fine_tuning.jobs.list_events(job_id, limit=10_000).data
            if e.type == "metrics" and e.data and "train_loss" in e.data]


def messages_of(client, job_id):
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=10_000).data]


def ended(job):
    return job.status in ("succeeded", "failed", "cancelled")


def test_two_jobs_at_once_on_two_nodes_followed_across_a_killed_studio(studio, cluster, tmp_path, tiny_model_dir):
    """Two jobs run at once, each on a node of its own; the studio is killed (SIGKILL) while they run and started
    again: it finds both by their submission ids, follows them to the end, and serves both models."""
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    jobs = [c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, suffix=f"n{i}",
                                      hyperparameters={"n_epochs": 4, "batch_size": 4},
                                      extra_body={"tunesmith": {"overrides": FAST}}) for i in range(2)]
    for j in jobs:
        wait(c, j.id, lambda j: len(steps_of(c, j.id)) >= 2)
    studio.kill()  # nothing of the studio runs on; the Ray jobs do
    assert {cluster.jobs.get_job_info(j.id).status.value for j in jobs} == {"RUNNING"}
    studio.start()
    c = studio.client()
    done = [wait(c, j.id, ended) for j in jobs]
    assert [j.status for j in done] == ["succeeded", "succeeded"], [j.error for j in done]
    infos = [cluster.jobs.get_job_info(j.id) for j in jobs]  # submission id = the job's id
    assert {i.status.value for i in infos} == {"SUCCEEDED"}
    assert infos[0].driver_node_id != infos[1].driver_node_id  # each on a node of its own
    assert max(i.start_time for i in infos) < min(i.end_time for i in infos)  # and at the same time
    for j in done:
        assert sorted(steps_of(c, j.id)) == list(range(1, 25))  # 4 epochs of 6 steps: each step's event once
        messages = messages_of(c, j.id)
        assert "The studio restarted; it follows the job again" in messages
        assert any(m.startswith("Running on Ray node ") for m in messages)
        assert j.fine_tuned_model in [m.id for m in c.models.list()] and j.trained_tokens > 0
        assert c.fine_tuning.jobs.checkpoints.list(j.id).data
        answer = c.chat.completions.create(model=j.fine_tuned_model, messages=[{"role": "user", "content": "Say 3."}],
                                           max_tokens=4, temperature=0)
        assert answer.choices[0].message.content is not None and answer.model == j.fine_tuned_model
    assert [x.submission_id for x in cluster.jobs.list_jobs() if x.submission_id.startswith(jobs[0].id)] == [jobs[0].id]


def test_pause_resume_and_cancel_stop_the_ray_job_with_a_checkpoint(studio, cluster, tmp_path, tiny_model_dir):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id,
                                    extra_body={"tunesmith": {"overrides": LONG}})
    wait(c, job.id, lambda j: len(steps_of(c, j.id)) >= 3)
    c.fine_tuning.jobs.pause(job.id)
    wait(c, job.id, lambda j: j.status == "paused", timeout=150)
    at = max(x.step_number for x in c.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert f"Fine-tuning job paused (checkpoint at step {at})" in messages_of(c, job.id)
    assert at >= 3  # the checkpoint the stop wrote (SIGTERM), not only a periodic one
    assert cluster.jobs.get_job_info(job.id).status.value == "STOPPED"

    c.fine_tuning.jobs.resume(job.id)  # a second Ray job: Ray keeps a submission id for good
    wait(c, job.id, lambda j: j.status == "running" and max(steps_of(c, j.id) or [0]) > at + 2)
    assert cluster.jobs.get_job_info(f"{job.id}-2").status.value == "RUNNING"
    newest = steps_of(c, job.id)
    assert at + 1 in newest and newest.count(1) == 1  # it went on from the checkpoint, not from the start

    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    wait(c, job.id, lambda j: any(m.startswith("Fine-tuning job cancelled (checkpoint at step")
                                  for m in messages_of(c, j.id)[:5]), timeout=150)
    last = max(x.step_number for x in c.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert last > at + 2 and cluster.jobs.get_job_info(f"{job.id}-2").status.value == "STOPPED"


def test_one_job_on_two_nodes_trains_under_torchrun(studio, cluster, tmp_path, tiny_model_dir):
    """tunesmith.resources nodes x processes: one Ray job whose launcher places a `tunesmith train --nnodes 2` on each
    of two nodes (a STRICT_SPREAD placement group); they train one model data-parallel (the global batch is split
    over both, so 2 epochs of 24 rows at batch 4 per process are 6 steps, not 12)."""
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, suffix="ddp",
                                    hyperparameters={"n_epochs": 2, "batch_size": 4},
                                    extra_body={"tunesmith": {"overrides": FAST,
                                                              "resources": {"nodes": 2, "processes": 1}}})
    done = wait(c, job.id, ended, timeout=360)
    assert done.status == "succeeded", done.error
    assert sorted(steps_of(c, job.id)) == list(range(1, 7))
    assert "2 nodes x 1 processes" in cluster.jobs.get_job_logs(job.id)
    for i in range(2):  # each node's own command ran and said so
        assert (studio.home / "jobs" / f"{job.id}-node{i}.log").stat().st_size > 0
    answer = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Say 2."}],
                                       max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_dead_worker_node_fails_the_job_by_name_and_resume_continues(studio, cluster, tmp_path, tiny_model_dir):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id,
                                    extra_body={"tunesmith": {"overrides": LONG}})
    wait(c, job.id, lambda j: c.fine_tuning.jobs.checkpoints.list(j.id).data)  # a periodic checkpoint (step 5)
    node_id = cluster.jobs.get_job_info(job.id).driver_node_id
    node = next(n for n in cluster.workers if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)  # the node dies: its raylet and every process on it
    cluster.workers.remove(node)

    failed = wait(c, job.id, ended, timeout=180)
    assert failed.status == "failed" and failed.error.code == "training_failed"
    assert failed.error.message.startswith("the Ray node ") and f"(node id {node_id[:12]}) running this job died" \
        in failed.error.message and "resume the job" in failed.error.message

    at = max(x.step_number for x in c.fine_tuning.jobs.checkpoints.list(job.id).data)  # the dead node's last one
    c.fine_tuning.jobs.resume(job.id)  # on the node that is left, from the newest checkpoint
    wait(c, job.id, lambda j: any(m.startswith(f"resumed from step-{at:07d}: step {at} of")  # the run's own line
                                  for m in messages_of(c, j.id)))
    wait(c, job.id, lambda j: max(steps_of(c, j.id)) > at + 5)  # and trains on
    assert cluster.jobs.get_job_info(f"{job.id}-2").driver_node_id == cluster.workers[0].node_id
    assert steps_of(c, job.id).count(1) == 1  # not from the start
    c.fine_tuning.jobs.cancel(job.id)
    wait(c, job.id, lambda j: any(m.startswith("Fine-tuning job cancelled") for m in messages_of(c, j.id)[:5]),
         timeout=150)


def test_the_ray_flags_say_what_is_wrong(tmp_path, capsys):
    from tunesmith.cli.main import main
    from tunesmith.studio.jobs import JobError, check_resources

    assert main(["studio", "--home", str(tmp_path / "a"), "--executor", "ray"]) == 2
    assert "--executor ray needs --ray-address" in capsys.readouterr().err
    assert main(["studio", "--home", str(tmp_path / "b"), "--executor", "ray", "--ray-address",
                 f"http://127.0.0.1:{free_port()}"]) == 2
    assert "no Ray cluster's job server answers there" in capsys.readouterr().err
    assert check_resources({"cpus": 2, "gpus": 1, "memory_gb": 0.5}) == {"cpus": 2, "gpus": 1, "memory_gb": 0.5}
    for bad, says in (({"cpu": 1}, "tunesmith.resources.cpu: unknown"), ({"gpus": -1}, "expected a number >= 0"),
                      ({"cpus": True}, "expected a number"), ({"cpus": 0}, "at least some CPUs or GPUs"),
                      ([1], "expected an object")):
        with pytest.raises(JobError, match=says):
            check_resources(bad)
