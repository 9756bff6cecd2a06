"""Independent jobs, run here one after another or as Ray tasks across a cluster.

`connect()` reads `RAY_ADDRESS` (`auto`, or a head's `host:port`): unset, every job runs in this process as
before; set, each job is a Ray task that asks for its CPUs and any custom resource (a board farm's
`board:rpi4`), its worker's output reaches this console prefixed with the node, a task whose worker is lost
is retried once, and a second loss, or an error in the job, stops the run naming the job and its node.
Ray is the engine (a home-made runner would have none of its scheduling, object store or fault handling);
it is an optional extra, so the default install stays lean.

Results are the same whichever way a job runs: a job fixes its own torch thread count (`Job.threads`), so
its float reductions split the same way in this process and on a worker. Jobs must not start jobs: inside
a task `connect()` always answers the local runner, so a nested sweep cannot wait on CPUs its parent holds.
"""

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from pipeline.errors import ClusterError, PipelineError

INSIDE_TASK = "CNN_DEPLOY_IN_RAY_TASK"
# What a worker needs from this shell to find data, checkpoints and the shared caches: passed to every task.
PASSED_ENV = ("CNN_DEPLOY_CACHE", "CIFAR10_DIR", "CIFAR_RESNET_DIR", "FASHION_MNIST_DIR")


@dataclass(frozen=True)
class Job:
    """One call `fn(*args, **kwargs)`. `name` is what the user reads in progress and errors; `resources` are
    Ray custom resources the node must declare (e.g. {"board:rpi4": 1}); `threads` is both the CPUs asked
    for and torch's thread count while the job runs, here or remote; `gpus` the GPUs it asks Ray for (a job
    whose torch work runs on CUDA)."""

    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    threads: int = 1
    resources: dict = field(default_factory=dict)
    gpus: int = 0


def board_resource(target: str, device_kind: str) -> str:
    """The custom resource a node declares for a board it drives: `board:rpi4` for a real board reached over
    SSH, `board:<target>-<kind>` for an emulated or interpreted one (`board:cortex-m4-qemu`)."""
    return f"board:{target}" if device_kind == "ssh" else f"board:{target}-{device_kind}"


def _call(job_fn, threads: int, args, kwargs):
    """A job under its own thread count; returns its result and the node and seconds it took."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        result = job_fn(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)
    return result, {"node": socket.gethostname(), "seconds": round(time.perf_counter() - started, 3)}


class Local:
    """Every job in this process, in order."""

    name = "local"

    def put(self, value):
        return value

    def run(self, jobs: list[Job], *, desc: str, progress: bool = True, log=print) -> list:
        return [_call(job.fn, job.threads, job.args, job.kwargs)[0]
                for job in tqdm(jobs, desc=desc, unit="job", disable=not progress or len(jobs) < 2, leave=False)]


def _node() -> str:
    import ray

    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"


def _remote_call(job_fn, threads: int, kwargs, *args):
    os.environ[INSIDE_TASK] = "1"
    try:
        result, facts = _call(job_fn, threads, args, kwargs)
    except Exception as exc:
        exc.node = _node()  # travels with the pickled exception, so the driver can say where it happened
        raise
    return result, {**facts, "node": _node()}


class Ray:
    """Every job a Ray task; results in the jobs' order. Large inputs shared by many jobs go in once with
    `put` (a job's top-level arguments that are object refs arrive as their values)."""

    name = "ray"

    def __init__(self, address: str):
        # Read when Ray is imported. Ray otherwise replaces this process's builtins.print with its own once a
        # worker reports a bar, and folds worker lines that differ only in their numbers: two grid points'
        # epoch lines would show as one "[repeated 2x across cluster]", hiding one point's accuracy.
        os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        self.ray = ray
        self.address = address
        if not ray.is_initialized():
            _check_reachable(address)
            env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
            try:
                ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True,
                         logging_level="WARNING", configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ClusterError(f"RAY_ADDRESS={address}: no Ray cluster answered ({exc}); expected a running head "
                                   "(`ray start --head`) or RAY_ADDRESS unset to run here") from exc
        self.remote = ray.remote(_remote_call)

    def put(self, value):
        return self.ray.put(value)

    def nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def run(self, jobs: list[Job], *, desc: str, progress: bool = True, log=print) -> list:
        ray = self.ray
        self._check_feasible(jobs)
        refs = {}
        for i, job in enumerate(jobs):
            task = self.remote.options(**self.task_options(job))
            refs[task.remote(job.fn, job.threads, job.kwargs, *job.args)] = i
        results, nodes, spent = [None] * len(jobs), Counter(), []
        bar = tqdm(total=len(jobs), desc=f"{desc} (ray)", unit="task", disable=not progress, leave=False)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = refs[done[0]]
                results[i], facts = self._get(done[0], jobs[i])
                nodes[facts["node"]] += 1
                spent.append(facts["seconds"])
                bar.update()
                bar.set_postfix_str(f"{jobs[i].name} on {facts['node']} {facts['seconds']:.1f} s")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
        spent.sort()
        log(f"{desc}: {len(jobs)} tasks on Ray ({self.address}): " + ", ".join(f"{n} ran {k}" for n, k in nodes.items())
            + (f"; task seconds: {sum(spent):.1f} in all, median {spent[len(spent) // 2]:.2f}, longest {spent[-1]:.1f}"
               if spent else ""))
        return results

    @staticmethod
    def task_options(job: Job) -> dict:
        """What a job asks Ray for. max_retries: a task whose worker process or node dies is run once more; an
        exception raised by the job itself is not retried (it would fail the same way)."""
        return {"num_cpus": job.threads, "num_gpus": job.gpus, "resources": job.resources or None, "max_retries": 1,
                "retry_exceptions": False, "name": job.name}

    def _check_feasible(self, jobs: list[Job]) -> None:
        """Ray would wait forever on a task no node can take: refuse it now, naming what the nodes offer."""
        nodes = [n["Resources"] for n in self.nodes()]
        for job in jobs:
            wanted = {"CPU": job.threads, **({"GPU": job.gpus} if job.gpus else {}), **job.resources}
            if not any(all(offer.get(k, 0) >= v for k, v in wanted.items()) for offer in nodes):
                offered = sorted({k for offer in nodes for k in offer if k.startswith("board:")})
                raise ClusterError(f"{job.name} needs {wanted} and no node of the cluster at {self.address} offers it; "
                                   f"boards declared: {', '.join(offered) or 'none'} (a node declares one with "
                                   "`ray start --resources '{\"board:rpi4\": 1}'`)")

    def _get(self, ref, job: Job):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            where = f"on {getattr(cause, 'node', None) or 'the cluster'}"
            if isinstance(cause, PipelineError):
                raise type(cause)(f"{job.name} ({where}): {cause}") from cause
            raise ClusterError(f"{job.name} failed {where}: {type(cause or exc).__name__}: {cause or exc}") from exc
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                ray.exceptions.OwnerDiedError) as exc:
            raise ClusterError(f"{job.name}: its worker was lost twice (retried once); last: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"{job.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def _check_reachable(address: str) -> None:
    """Ray's own connect waits minutes on a head that is not there; a plain TCP connect says so at once."""
    if address == "auto":  # the head this machine started: ray.init finds it or fails quickly
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise ClusterError(f"RAY_ADDRESS={address}: no Ray cluster answered ({exc}); expected `auto` or a running "
                           "head's host:port (`ray start --head`), or RAY_ADDRESS unset to run here") from exc


def connect():
    """The runner `RAY_ADDRESS` asks for: Ray when set (and not already inside a Ray task), else this process."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or os.environ.get(INSIDE_TASK):
        return Local()
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise ClusterError(f"RAY_ADDRESS={address} but Ray is not installed; expected `make setup-cluster` "
                           "(pip install -e '.[cluster]'), or RAY_ADDRESS unset to run here") from exc
    return Ray(address)
