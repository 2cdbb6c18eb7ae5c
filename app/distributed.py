"""Start-up checks for an engine spread over several devices or nodes.

Each one fails with a message naming the setting and a way out, instead of the hang or
the late error vLLM would give: more GPUs asked for than this process sees, the Ray
executor without ``ray`` installed, a Ray cluster that never offers the GPUs the engine
needs. ``python -m app.ray_wait`` (the multi-node leader's wait step) uses the same
cluster wait.
"""

import importlib.util
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from app.settings import Settings

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 2.0


class StartupError(RuntimeError):
    """A configuration this machine or cluster cannot run; the message says which setting."""


def world_size(settings: Settings) -> int:
    return settings.tensor_parallel_size * settings.pipeline_parallel_size


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def visible_gpus() -> int:
    import torch

    return int(torch.cuda.device_count())


def check_parallel_layout(
    settings: Settings,
    on_gpu: bool,
    *,
    gpus: Callable[[], int] = visible_gpus,
    has_ray: Callable[[], bool] = ray_installed,
) -> None:
    """Raises StartupError when the parallel layout cannot start here."""
    size = world_size(settings)
    layout = (
        f"KAITO_TENSOR_PARALLEL_SIZE={settings.tensor_parallel_size} x "
        f"KAITO_PIPELINE_PARALLEL_SIZE={settings.pipeline_parallel_size} = {size}"
    )
    if settings.distributed_executor_backend == "ray":
        if not has_ray():
            raise StartupError(
                "KAITO_DISTRIBUTED_EXECUTOR_BACKEND=ray needs the `ray` package, which is not "
                "installed here: install the project's `ray` extra (the GPU image has it), "
                "or use KAITO_DISTRIBUTED_EXECUTOR_BACKEND=mp on one node"
            )
        # Across nodes the cluster, not this node, must hold the GPUs: wait_for_ray_cluster.
        return
    if on_gpu:
        seen = gpus()
        if size > seen:
            raise StartupError(
                f"{layout} GPUs, but this process sees {seen} (the pod's nvidia.com/gpu, "
                "CUDA_VISIBLE_DEVICES): request that many GPUs, lower the sizes, or spread "
                "the model over nodes with KAITO_DISTRIBUTED_EXECUTOR_BACKEND=ray "
                "(docs/LARGE_MODELS.md)"
            )


def connect_to_ray(address: str | None = None, timeout_s: float = 60) -> Any:
    """ray.init on an existing cluster (RAY_ADDRESS, else the one `ray start` runs on this
    node); a clear StartupError when there is none, rather than a new private cluster.

    A host:port address is first waited for with plain TCP connects, up to timeout_s (a
    head that is still starting is fine): ray.init on an address where nothing listens
    retries for minutes before it gives up."""
    import ray

    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    host, sep, port = target.rpartition(":")
    if sep and host and port.isdigit():
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"KAITO_DISTRIBUTED_EXECUTOR_BACKEND=ray: no Ray cluster at {target!r} "
                        f"(nothing answered there for {timeout_s:g} s: {exc}). Start the head "
                        "first (`ray start --head`; the multinode overlay's leader does), or "
                        "fix RAY_ADDRESS"
                    ) from exc
                time.sleep(POLL_INTERVAL_S)
    try:
        ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise StartupError(
            f"KAITO_DISTRIBUTED_EXECUTOR_BACKEND=ray: no Ray cluster at {target!r} ({exc}). "
            "Start one first (`ray start --head` on the leader, `ray start "
            "--address=LEADER:6379` on the workers; the multinode overlay does), or set "
            "RAY_ADDRESS"
        ) from exc
    return ray


def wait_until(
    describe: Callable[[], tuple[bool, str]],
    timeout_s: float,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Polls ``describe`` (-> (done, state)) until done; StartupError after timeout_s."""
    deadline = clock() + timeout_s
    while True:
        done, state = describe()
        if done:
            return state
        if clock() >= deadline:
            raise StartupError(
                f"the Ray cluster did not reach {what} within {timeout_s:g} s "
                f"(KAITO_RAY_CLUSTER_TIMEOUT_SECONDS); it has {state}"
            )
        log.info("waiting for the Ray cluster: %s, want %s", state, what)
        sleep(POLL_INTERVAL_S)


def alive_nodes(ray: Any) -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def wait_for_ray_cluster(settings: Settings, on_gpu: bool) -> None:
    """Blocks until the Ray cluster offers the engine's GPUs (tensor x pipeline parallel),
    or raises StartupError at KAITO_RAY_CLUSTER_TIMEOUT_SECONDS. vLLM itself would wait
    for its placement group for 30 minutes with nothing but a log line."""
    ray = connect_to_ray(timeout_s=settings.ray_cluster_timeout_seconds)
    try:
        need = world_size(settings)
        if on_gpu:

            def describe() -> tuple[bool, str]:
                gpus = ray.cluster_resources().get("GPU", 0)
                return gpus >= need, f"{gpus:g} GPUs on {alive_nodes(ray)} nodes"

            what = f"{need} GPUs"
        else:
            # On CPU, vLLM places one worker per CPU slot of the cluster.
            def describe() -> tuple[bool, str]:
                cpus = ray.cluster_resources().get("CPU", 0)
                return cpus >= need, f"{cpus:g} CPUs on {alive_nodes(ray)} nodes"

            what = f"{need} CPUs"
        state = wait_until(describe, settings.ray_cluster_timeout_seconds, what)
        log.info("Ray cluster ready: %s", state)
    finally:
        # vLLM's engine core (another process) connects on its own.
        ray.shutdown()
