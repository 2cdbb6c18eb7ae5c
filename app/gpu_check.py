"""Before the engine starts on a GPU: can this node's NVIDIA driver run this image's torch?

PyPI's torch wheels bring the CUDA runtime and libraries; only the driver (libcuda,
libnvidia-ml) comes from the node. A driver older than the CUDA major the wheels are built
on makes torch see no GPU, and vLLM then fails deep in its start-up with an error that does
not say why: the pod crash-loops with no hint. This check reads the driver the container
was given and stops start-up with a message naming the driver found and the floor.

    python -m app.gpu_check [--min-driver VERSION]

prints what it found (driver, the CUDA version it supports, each GPU) and exits 1 when the
server would refuse to start. ``--min-driver`` raises the floor, to see the refusal on a
node whose driver is new enough (scripts/gpu-smoke.sh does).
"""

import argparse
import ctypes
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The oldest Linux driver of each CUDA major (NVIDIA's CUDA release notes, "CUDA Toolkit
# and Minimum Required Driver Version for CUDA Minor Version Compatibility"): a driver of
# that branch runs every minor release of the major.
DRIVER_FLOOR: dict[int, tuple[int, ...]] = {12: (525, 60, 13), 13: (580,)}
# The oldest GPU architecture each CUDA major still supports: CUDA 13 dropped Maxwell,
# Pascal and Volta (compute capability < 7.5; a V100 is 7.0).
MIN_CAPABILITY: dict[int, tuple[int, int]] = {12: (5, 0), 13: (7, 5)}
PROC_VERSION = Path("/proc/driver/nvidia/version")
# Where GKE mounts its managed driver (the image puts it on LD_LIBRARY_PATH).
GKE_DRIVER_DIR = "/usr/local/nvidia/lib64"


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]
    memory_mib: int


@dataclass
class DriverInfo:
    """What the container sees of the node's driver; None where it could not be read."""

    version: str | None = None
    # The newest CUDA the driver supports, as NVML reports it: 12080 for 12.8.
    cuda: int | None = None
    gpus: list[GPU] = field(default_factory=list)
    # Set when NVML (libnvidia-ml.so.1) could not be loaded: the GPUs are then unknown.
    nvml_error: str | None = None


def parse_version(text: str) -> tuple[int, ...]:
    """ "580.65.06" -> (580, 65, 6)."""
    return tuple(int(part) for part in text.strip().split("."))


def format_version(version: tuple[int, ...]) -> str:
    return ".".join(f"{part:02d}" if i else str(part) for i, part in enumerate(version))


def cuda_major(runtime_cuda: str) -> int:
    return int(runtime_cuda.split(".")[0])


def driver_floor(runtime_cuda: str) -> tuple[int, ...]:
    """The oldest driver that runs a CUDA ``runtime_cuda`` build ("13.0" -> (580,))."""
    major = cuda_major(runtime_cuda)
    if major not in DRIVER_FLOOR:
        raise ValueError(f"no known driver floor for CUDA {runtime_cuda}")
    return DRIVER_FLOOR[major]


def problems(
    info: DriverInfo,
    runtime_cuda: str,
    torch_version: str = "torch",
    min_driver: tuple[int, ...] | None = None,
) -> list[str]:
    """Why this image cannot run on this node's driver and GPUs; empty when it can.

    ``runtime_cuda`` is the CUDA version torch is built on (torch.version.cuda);
    ``min_driver`` overrides the floor that follows from it.
    """
    floor = min_driver or driver_floor(runtime_cuda)
    built = f"this image's {torch_version} is built on CUDA {runtime_cuda}"
    if info.version is None:
        loader_path = os.environ.get("LD_LIBRARY_PATH", "")
        return [
            f"no NVIDIA driver found: {info.nvml_error or 'NVML did not load'}, and "
            f"{PROC_VERSION} is absent. {built.capitalize()}, which needs driver >= "
            f"{format_version(floor)} from the node. The container gets it from the NVIDIA "
            "container toolkit when the pod requests nvidia.com/gpu; on GKE the driver is "
            f"mounted at {GKE_DRIVER_DIR}, which must be on LD_LIBRARY_PATH "
            f"(now {loader_path!r})."
        ]
    found = parse_version(info.version)
    out = []
    if found < floor:
        supports = ""
        if info.cuda:
            supports = f", which supports CUDA up to {info.cuda // 1000}.{info.cuda % 1000 // 10}"
        out.append(
            f"NVIDIA driver {info.version} is too old: {built}, which needs driver >= "
            f"{format_version(floor)} (found {info.version}{supports}). Upgrade the node's "
            f"driver to the R{floor[0]} branch or newer (GPU Operator: driver.version; "
            "GKE, AKS, EKS: a GPU node image or driver version of that branch), or schedule "
            "the pod on nodes that have it."
        )
    if info.nvml_error is None and not info.gpus:
        out.append(
            f"NVIDIA driver {info.version} sees no GPU in this container: the pod did not get "
            "one (request nvidia.com/gpu) or NVIDIA_VISIBLE_DEVICES hides them."
        )
    oldest = MIN_CAPABILITY.get(cuda_major(runtime_cuda))
    for index, gpu in enumerate(info.gpus):
        if oldest is not None and gpu.capability < oldest:
            out.append(
                f"GPU {index} ({gpu.name}) has compute capability "
                f"{gpu.capability[0]}.{gpu.capability[1]}; {built}, which supports "
                f"{oldest[0]}.{oldest[1]} and newer (Turing, Ampere, Hopper, Blackwell): "
                "Volta (V100) and older GPUs cannot run this image."
            )
    return out


# --- reading the driver ---------------------------------------------------------------


class _Memory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


def _read_nvml(info: DriverInfo) -> None:
    """Fills ``info`` from NVML (libnvidia-ml.so.1, mounted from the node with the driver),
    through ctypes: importing torch or pynvml is not needed to ask the driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as exc:
        info.nvml_error = f"libnvidia-ml.so.1 could not be loaded ({exc})"
        return
    if nvml.nvmlInit_v2() != 0:
        info.nvml_error = "nvmlInit failed"
        return
    try:
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0:
            info.version = buffer.value.decode()
        cuda = ctypes.c_int()
        if nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda)) == 0:
            info.cuda = cuda.value
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            name = ctypes.create_string_buffer(96)
            nvml.nvmlDeviceGetName(handle, name, 96)
            major, minor = ctypes.c_int(), ctypes.c_int()
            nvml.nvmlDeviceGetCudaComputeCapability(
                handle, ctypes.byref(major), ctypes.byref(minor)
            )
            memory = _Memory()
            nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory))
            info.gpus.append(
                GPU(name.value.decode(), (major.value, minor.value), memory.total // 2**20)
            )
    finally:
        nvml.nvmlShutdown()


def read_driver(proc_version: Path = PROC_VERSION) -> DriverInfo:
    """The driver this container sees: NVML first, else the kernel module's version file
    (which names the driver even when its libraries are not on the loader path)."""
    info = DriverInfo()
    _read_nvml(info)
    if info.version is None and proc_version.is_file():
        # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  ..." or, for the
        # open modules, "... Open Kernel Module for x86_64  570.133.20  Release Build ...".
        match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", proc_version.read_text())
        if match:
            info.version = match.group(1)
    return info


def torch_cuda() -> tuple[str | None, str]:
    """(the CUDA version torch is built on, or None for a CPU build; torch's version)."""
    import torch

    return torch.version.cuda, f"torch {torch.__version__}"


def preflight(device: str, min_driver: tuple[int, ...] | None = None) -> list[str]:
    """The server's start-up check. ``device`` is KAITO_DEVICE: with ``auto`` a node
    without a driver is not a problem (the engine picks the CPU); with ``cuda`` it is."""
    if device == "cpu":
        return []
    runtime_cuda, torch_version = torch_cuda()
    if runtime_cuda is None:  # a CPU build of torch (the cpu image): nothing to check
        return []
    info = read_driver()
    if device == "auto" and info.version is None:
        return []
    return problems(info, runtime_cuda, torch_version, min_driver)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.gpu_check", description=__doc__)
    parser.add_argument(
        "--min-driver",
        type=parse_version,
        default=None,
        help="require this driver instead of the floor of torch's CUDA (e.g. 999.0)",
    )
    args = parser.parse_args(argv)
    runtime_cuda, torch_version = torch_cuda()
    info = read_driver()
    print(f"{torch_version}, built on CUDA {runtime_cuda or '(none: a CPU build)'}")
    if runtime_cuda is not None:
        floor = args.min_driver or driver_floor(runtime_cuda)
        print(f"driver floor: {format_version(floor)}")
    cuda = f"{info.cuda // 1000}.{info.cuda % 1000 // 10}" if info.cuda else "unknown"
    print(f"driver: {info.version or 'not found'} (supports CUDA {cuda})")
    if info.nvml_error:
        print(f"NVML: {info.nvml_error}")
    for index, gpu in enumerate(info.gpus):
        major, minor = gpu.capability
        print(f"GPU {index}: {gpu.name}, compute capability {major}.{minor}, {gpu.memory_mib} MiB")
    if runtime_cuda is None:
        return 0
    found = problems(info, runtime_cuda, torch_version, args.min_driver)
    for problem in found:
        print(f"ERROR: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
