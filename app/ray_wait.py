"""``python -m app.ray_wait --nodes N``: wait until the Ray cluster has N live nodes.

The multi-node leader's wait step (manifests/overlays/multinode): it starts the Ray head,
runs this, then the server. It exits 0 once the group's nodes have joined, and 1 with a
message saying how many did when the timeout passes (the pod then restarts and
LeaderWorkerSet recreates the group), never waiting forever.
"""

import argparse
import logging
import sys

from app.distributed import StartupError, alive_nodes, connect_to_ray, wait_until
from app.settings import Settings

log = logging.getLogger("app.ray_wait")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.ray_wait", description=__doc__)
    parser.add_argument("--nodes", type=int, required=True, help="Live nodes to wait for.")
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs the cluster must offer too (default 0: nodes only).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="Seconds before giving up (default: KAITO_RAY_CLUSTER_TIMEOUT_SECONDS).",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else auto)."
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    timeout = args.timeout if args.timeout is not None else Settings().ray_cluster_timeout_seconds
    try:
        ray = connect_to_ray(args.address, timeout)
        try:

            def describe() -> tuple[bool, str]:
                nodes = alive_nodes(ray)
                gpus = ray.cluster_resources().get("GPU", 0)
                return nodes >= args.nodes and gpus >= args.gpus, f"{nodes} nodes, {gpus:g} GPUs"

            want = f"{args.nodes} nodes" + (f" and {args.gpus} GPUs" if args.gpus else "")
            state = wait_until(describe, timeout, want)
        finally:
            ray.shutdown()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    log.info("Ray cluster ready: %s", state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
