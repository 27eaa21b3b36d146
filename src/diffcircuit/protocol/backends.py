"""Where a run's shards are computed: in this process (``local``) or by Ray workers (``ray``).

Both backends take the same ``Task`` list and leave the same files in the shard store; the driver
then reads every shard back from disk, merges, computes the statistics and writes the report, so
the two backends give identical tables for the same number of intra-op threads (CPU kernels sum in a
thread-dependent order): Ray workers use ``--threads``, or by default their share of the driver's
(cores ÷ workers on CPU, so that workers x threads never exceed the cores; the driver's on GPU).

Ray: each worker is an actor that builds the model, registry and images once and computes shards
on request, returning their encoded parts; the driver writes them atomically, so a worker can die
at any moment without leaving a half-written shard. Actors restart and their tasks are retried
(``max_restarts`` / ``max_task_retries``), so a killed worker costs time, not results. With
``address`` the run joins an existing cluster (every node needs diffcircuit installed; the model
path and image folders must be readable there); without it a local Ray instance sized to this
machine is started and stopped. Each worker asks for one GPU when the device is cuda.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence

from diffcircuit.errors import ConfigError, DiffcircuitError
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.store import Shards, encode_part
from diffcircuit.protocol.tasks import Context, Task, compute

__all__ = ["BACKENDS", "LocalBackend", "RayBackend", "make_backend"]

BACKENDS = ("local", "ray")
Progress = Callable[[Task, int], None]


class LocalBackend:
    """Computes shards one after another in this process, with the driver's context."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def run(self, tasks: Sequence[Task], shards: Shards, progress: Progress) -> None:
        for task in tasks:
            if shards.done(task.name, task.files):
                shards.note_resumed(task.name)
                progress(task, task.units)
                continue
            start = time.perf_counter()
            values = compute(self.ctx, task, lambda k, task=task: progress(task, k))
            shards.write(
                task.name,
                {p: encode_part(p, values[p]) for p in task.files},
                time.perf_counter() - start,
            )

    def close(self) -> None:
        pass


class _ShardWorker:
    """A Ray actor: one model, registry and image sets, many shards."""

    def __init__(self, config: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.ctx = Context.build(RunConfig.from_mapping(config, source="ray worker"))

    def pid(self) -> int:
        return os.getpid()

    def compute(self, task: Task) -> tuple[dict[str, bytes], float]:
        start = time.perf_counter()
        values = compute(self.ctx, task)
        return {p: encode_part(p, values[p]) for p in task.files}, time.perf_counter() - start


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in one line, at once, when a given cluster address does not answer (Ray itself retries for minutes)."""
    import socket

    if not address or address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} (expected HOST:PORT or ray://HOST:PORT)",
            "ray_address",
        ) from None


class RayBackend:
    """Shards as Ray actor tasks: one actor per worker, each holding the model once."""

    def __init__(self, cfg: RunConfig, log: logging.Logger):
        try:
            import ray
        except ImportError:
            raise ConfigError("the ray backend needs Ray: pip install 'diffcircuit[ray]'") from None
        import torch

        self.ray, self.log = ray, log
        self.started = not ray.is_initialized()
        if self.started:
            _check_reachable(cfg.ray_address)
            try:
                ray.init(
                    address=cfg.ray_address or None,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    configure_logging=False,
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(
                    f"cannot start or join Ray at {cfg.ray_address or 'a local instance'}: "
                    f"{str(exc).splitlines()[0]}",
                    "ray_address",
                ) from None
        cuda = torch.device(cfg.torch_device).type == "cuda"
        available = float(ray.cluster_resources().get("GPU" if cuda else "CPU", 0))
        if available <= 0:
            raise ConfigError(
                f"the Ray cluster has no {'GPU' if cuda else 'CPU'}s for device {cfg.torch_device}",
                "device",
            )
        count = cfg.workers or max(1, int(available))
        share = min(
            1.0, available / count
        )  # more workers than devices share them, rather than wait forever
        # on CPU, workers x threads stay within the cores unless --threads asks for more (oversubscribed OpenMP
        # threads slow every worker down several-fold); on GPU each worker keeps the driver's threads
        threads = cfg.threads or (
            torch.get_num_threads() if cuda else max(1, torch.get_num_threads() // count)
        )
        actor = ray.remote(_ShardWorker).options(
            num_cpus=0 if cuda else share,
            num_gpus=share if cuda else 0,
            max_restarts=-1,
            max_task_retries=-1,
        )
        self.workers = [actor.remote(cfg.to_dict(), threads) for _ in range(count)]
        for i, pid in enumerate(self._get([w.pid.remote() for w in self.workers])):
            log.info("ray worker %d: pid %d (%d threads)", i, pid, threads)

    def _get(self, refs):
        """``ray.get``, with an input error raised in a worker re-raised here as itself (one line, no traceback)."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DiffcircuitError):
                raise cause from None
            raise

    def run(self, tasks: Sequence[Task], shards: Shards, progress: Progress) -> None:
        ray = self.ray
        queue = deque()
        for task in tasks:
            if shards.done(task.name, task.files):
                shards.note_resumed(task.name)
                progress(task, task.units)
            else:
                queue.append(task)
        running = {}  # object ref -> (task, worker)
        idle = list(self.workers)
        while queue or running:
            while queue and idle:
                task, worker = queue.popleft(), idle.pop()
                running[worker.compute.remote(task)] = (task, worker)
            ready, _ = ray.wait(list(running), num_returns=1)
            task, worker = running.pop(ready[0])
            encoded, seconds = self._get(ready[0])
            shards.write(task.name, encoded, seconds, " (ray worker)")
            progress(task, task.units)
            idle.append(worker)

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        if self.started:
            self.ray.shutdown()


def make_backend(ctx: Context, log: logging.Logger):
    if ctx.cfg.backend == "ray":
        return RayBackend(ctx.cfg, log)
    return LocalBackend(ctx)
