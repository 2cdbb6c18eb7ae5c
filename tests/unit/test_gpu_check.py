"""The start-up driver check (app/gpu_check.py) on fake driver and GPU inputs: this machine
has no GPU, so the versions are the ones real nodes report. scripts/gpu-smoke.sh runs the
same check on a real driver."""

import logging
from pathlib import Path

import pytest

import app.__main__ as entry
from app import gpu_check
from app.gpu_check import GPU, DriverInfo, driver_floor, format_version, problems

H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0), 81559)
L4 = GPU("NVIDIA L4", (8, 9), 23034)
V100 = GPU("Tesla V100-SXM2-32GB", (7, 0), 32768)
T4 = GPU("Tesla T4", (7, 5), 15360)


def test_floor_follows_torchs_cuda_major() -> None:
    assert driver_floor("13.0") == (580,)
    assert driver_floor("13.2") == (580,)  # minor version compatibility within 13.x
    assert driver_floor("12.8") == (525, 60, 13)
    with pytest.raises(ValueError, match="CUDA 14.0"):
        driver_floor("14.0")
    assert format_version((580, 65, 6)) == "580.65.06"


@pytest.mark.parametrize(
    ("version", "cuda", "ok"),
    [
        ("580.65.06", 13000, True),
        ("580.0", 13000, True),
        ("590.44.01", 13010, True),
        ("579.99", 12090, False),
        ("570.172.08", 12080, False),  # R570: CUDA 12.8
        ("535.261.03", 12020, False),  # R535, still common on managed node images
    ],
)
def test_driver_version_against_the_cuda_13_floor(version: str, cuda: int, ok: bool) -> None:
    found = problems(DriverInfo(version, cuda, [H100]), "13.0", "torch 2.13.0")
    if ok:
        assert found == []
        return
    (message,) = found
    # Names what was found, the floor and why, so `kubectl logs` alone explains the crash.
    assert f"NVIDIA driver {version} is too old" in message
    assert "needs driver >= 580" in message
    assert "torch 2.13.0 is built on CUDA 13.0" in message
    assert f"supports CUDA up to {cuda // 1000}.{cuda % 1000 // 10}" in message


def test_a_raised_floor_refuses_a_new_driver() -> None:
    """What scripts/gpu-smoke.sh does to see the refusal on a node with a good driver."""
    info = DriverInfo("580.65.06", 13000, [H100])
    (message,) = problems(info, "13.0", min_driver=(999, 0))
    assert "580.65.06 is too old" in message and ">= 999.00" in message


def test_volta_and_older_are_refused_under_cuda_13() -> None:
    (message,) = problems(DriverInfo("580.65.06", 13000, [L4, V100]), "13.0")
    assert message.startswith("GPU 1 (Tesla V100-SXM2-32GB) has compute capability 7.0")
    assert "supports 7.5 and newer" in message
    # Turing (7.5) is still in CUDA 13; under CUDA 12 a V100 was fine.
    assert problems(DriverInfo("580.65.06", 13000, [T4]), "13.0") == []
    assert problems(DriverInfo("535.261.03", 12020, [V100]), "12.2") == []


def test_no_driver_names_the_loader_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/elsewhere")
    info = DriverInfo(nvml_error="libnvidia-ml.so.1 could not be loaded (not found)")
    (message,) = problems(info, "13.0")
    assert message.startswith("no NVIDIA driver found: libnvidia-ml.so.1 could not be loaded")
    assert "/usr/local/nvidia/lib64" in message and "'/opt/elsewhere'" in message


def test_a_driver_with_no_gpu_in_the_container() -> None:
    (message,) = problems(DriverInfo("580.65.06", 13000, []), "13.0")
    assert "sees no GPU" in message and "nvidia.com/gpu" in message


@pytest.mark.parametrize(
    ("first_line", "version"),
    [
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  "
            "(dvs-builder@U16-I3-B03-4-3)  Fri Mar 14 11:32:48 UTC 2025",
            "570.133.20",
        ),
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 "
            "UTC 2023",
            "535.104.05",
        ),
    ],
)
def test_read_driver_falls_back_to_the_kernel_modules_version(
    tmp_path: Path, first_line: str, version: str
) -> None:
    """No NVML on this machine (a real failed load); the version file still names the
    driver, as on a node whose libraries are not on the loader path."""
    proc = tmp_path / "version"
    proc.write_text(first_line + "\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    info = gpu_check.read_driver(proc)
    if info.nvml_error is None:
        pytest.skip("this machine has an NVIDIA driver: the fallback is not reached")
    assert info.version == version and info.gpus == []
    assert "too old" in problems(info, "13.0")[0]


def test_preflight_skips_cpu_and_cpu_builds_of_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu_check.preflight("cpu") == []
    monkeypatch.setattr(gpu_check, "torch_cuda", lambda: (None, "torch 2.13.0+cpu"))
    assert gpu_check.preflight("cuda") == []


def test_preflight_auto_without_a_driver_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "torch_cuda", lambda: ("13.0", "torch 2.13.0"))
    monkeypatch.setattr(gpu_check, "read_driver", lambda: DriverInfo(nvml_error="absent"))
    assert gpu_check.preflight("auto") == []
    assert "no NVIDIA driver found" in gpu_check.preflight("cuda")[0]


def test_server_refuses_to_start_on_an_old_driver(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """python -m app exits 1 before building the app, with the check's message logged."""
    monkeypatch.setattr(gpu_check, "torch_cuda", lambda: ("13.0", "torch 2.13.0"))
    monkeypatch.setattr(gpu_check, "read_driver", lambda: DriverInfo("570.172.08", 12080, [L4]))
    monkeypatch.setattr(entry, "configure_logging", lambda *args: None)

    def no_app(*args: object, **kwargs: object) -> None:
        raise AssertionError("the app must not be built")

    monkeypatch.setattr(entry, "create_app", no_app)
    with caplog.at_level(logging.ERROR, logger="app"):
        assert entry.main(["--device", "cuda"]) == 1
    (record,) = caplog.records
    assert record.getMessage().startswith("KAITO_DEVICE=cuda: NVIDIA driver 570.172.08 is too old")
    assert "needs driver >= 580" in record.getMessage()


def test_cli_reports_and_exits_nonzero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu_check, "torch_cuda", lambda: ("13.0", "torch 2.13.0"))
    monkeypatch.setattr(gpu_check, "read_driver", lambda: DriverInfo("580.65.06", 13000, [H100]))
    assert gpu_check.main([]) == 0
    assert (
        "GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0, 81559 MiB" in capsys.readouterr().out
    )
    assert gpu_check.main(["--min-driver", "999.0"]) == 1
    assert "ERROR: NVIDIA driver 580.65.06 is too old" in capsys.readouterr().err
