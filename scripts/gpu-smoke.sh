#!/usr/bin/env bash
# The GPU image on a real NVIDIA GPU: what no test without a GPU can show (docs/GPU.md).
# Run it on a machine with an NVIDIA GPU, its driver, Docker and the NVIDIA Container
# Toolkit (`docker run --gpus` works), from the repository root:
#
#   scripts/gpu-smoke.sh                 # build kaito-chat:<version>-gpu, then check it
#   IMAGE=registry.example.com/kaito-chat:0.1.0-gpu BUILD=0 scripts/gpu-smoke.sh
#
# It checks, in order, and stops at the first failure (exit 1):
#  1. the driver check: `python -m app.gpu_check` passes on this driver, and refuses it
#     with a message naming the driver and the floor when the floor is raised above it
#     (the refusal an R535-R570 node gets at start-up);
#  2. the image starts with the GPU overlays' settings on the default model
#     (SmolLM2-135M-Instruct, prepared from PyPI into a volume): /health turns 200;
#  3. which attention backend and top-k/top-p sampler the engine chose, from its log,
#     and that no FlashInfer or DeepGEMM kernel was JIT-compiled (the image has no nvcc);
#  4. a beam-sampling request gets the 400 naming generate_kwargs.do_sample (the
#     overlays' KAITO_HF_FALLBACK=false);
#  5. with the fallback on (float32 on both sides): greedy parity with transformers'
#     generate on the same GPU, and the beam-sampling request served by transformers.
#
# Needs: docker, curl, python3 (for JSON), network access for the build and for the
# default model's PyPI package. Leaves a volume `kaito-smoke-cache` (delete it after).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/pyproject.toml")"
image="${IMAGE:-kaito-chat:${version}-gpu}"
port="${PORT:-5055}"
gpus="${GPUS:-device=0}"
cache_volume="${CACHE_VOLUME:-kaito-smoke-cache}"
model_dir=/cache/models/SmolLM2-135M-Instruct
name=kaito-gpu-smoke
log_dir="$(mktemp -d)"
failures=0

say() { printf '\n>>> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
stop_server() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap stop_server EXIT

run_in_image() {  # python in the image, on the GPU, with the cache volume
    docker run --rm --gpus "$gpus" -v "$cache_volume:/cache" --entrypoint python "$image" "$@"
}

if [ "${BUILD:-1}" = 1 ]; then
    say "building $image (target gpu)"
    docker build --target gpu -t "$image" "$here"
fi
docker image inspect -f 'image size: {{.Size}} bytes' "$image"

say "1. driver check"
if run_in_image -m app.gpu_check; then
    echo "ok: this driver passes"
else
    fail "app.gpu_check refused this node's driver (its message is above)"
fi
set +e
refusal="$(run_in_image -m app.gpu_check --min-driver 999.0 2>&1)"
code=$?
set -e
echo "$refusal" | tail -3
if [ "$code" -eq 1 ] && echo "$refusal" | grep -q "is too old" &&
    echo "$refusal" | grep -q "needs driver >= 999.00"; then
    echo "ok: a driver under the floor is refused with the driver found and the floor"
else
    fail "a driver under the floor was not refused clearly (exit $code)"
fi

say "preparing the default model in volume $cache_volume"
run_in_image -m app.model_prep --dest "$model_dir"

start_server() {  # start_server LOG KEY=VALUE... : the image with these settings
    local log="$1"
    shift
    local envs=()
    for kv in "$@"; do envs+=(-e "$kv"); done
    stop_server
    docker run -d --name "$name" --gpus "$gpus" --shm-size 2g -p "127.0.0.1:$port:5000" \
        -v "$cache_volume:/cache" -e KAITO_MODEL="$model_dir" -e KAITO_LOG_FORMAT=text \
        "${envs[@]}" "$image" >/dev/null
    for _ in $(seq 1 120); do
        if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
            docker logs "$name" >"$log" 2>&1
            return 0
        fi
        if [ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ]; then
            break
        fi
        sleep 5
    done
    docker logs "$name" >"$log" 2>&1 || true
    tail -40 "$log" >&2
    return 1
}

chat() {  # chat JSON -> prints "STATUS BODY"
    curl -sS -o "$log_dir/body" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d "$1" "http://127.0.0.1:$port/chat"
    printf ' '
    cat "$log_dir/body"
}

beam_sampling='{"prompt": "Once upon a time", "generate_kwargs": {"do_sample": true, "num_beams": 2, "max_new_tokens": 16, "seed": 0}}'

say "2. the image starts with the GPU overlays' settings (fallback off, model dtype)"
if start_server "$log_dir/overlay.log" KAITO_DEVICE=cuda KAITO_HF_FALLBACK=false \
    KAITO_GPU_MEMORY_UTILIZATION=0.5; then
    echo "ok: /health is 200"

    say "3. what the engine chose (engine log)"
    attention="$(grep -oE 'Using [A-Za-z_0-9.]+ (attention )?backend' "$log_dir/overlay.log" | head -1)"
    echo "attention: ${attention:-not logged}"
    if grep -q "Using FlashInfer for top-p & top-k sampling" "$log_dir/overlay.log"; then
        echo "sampler: FlashInfer"
    else
        echo "sampler: PyTorch-native (no FlashInfer sampler line in the log)"
    fi
    grep -E "FlashInfer|DeepGEMM|deep_gemm" "$log_dir/overlay.log" | sed 's/^/  log: /' | head -10
    # vLLM's own warning that FlashInfer's kernels are off (no cubins, no nvcc) is
    # expected; a JIT build or a compiler lookup is not.
    if grep -iE "flashinfer\.jit|ninja|nvcc fatal|could not find nvcc|CUDA_HOME" \
        "$log_dir/overlay.log" | grep -qv "FlashInfer kernels are disabled"; then
        fail "the engine tried to compile kernels (see the log lines above)"
    else
        echo "ok: no JIT compilation of FlashInfer/DeepGEMM kernels"
    fi
    [ -n "$attention" ] || fail "the attention backend is not in the engine log"

    say "4. beam sampling without the fallback"
    reply="$(chat "$beam_sampling")"
    echo "$reply"
    if [[ "$reply" == 400* ]] && [[ "$reply" == *generate_kwargs.do_sample* ]] &&
        [[ "$reply" == *KAITO_HF_FALLBACK* ]]; then
        echo "ok: 400 naming the parameter and the setting"
    else
        fail "beam sampling without the fallback was not a 400 naming generate_kwargs.do_sample"
    fi
else
    fail "the server did not become healthy (log above)"
fi

say "5. greedy parity with transformers, and beam sampling with the fallback (float32)"
if start_server "$log_dir/fallback.log" KAITO_DEVICE=cuda KAITO_HF_FALLBACK=true \
    KAITO_DTYPE=float32 KAITO_GPU_MEMORY_UTILIZATION=0.5; then
    prompts='["The capital of France is", "Once upon a time", "def fibonacci(n):"]'
    for i in 0 1 2; do
        prompt="$(python3 -c "import json,sys; print(json.dumps(json.loads(sys.argv[1])[$i]))" "$prompts")"
        chat "{\"prompt\": $prompt, \"return_full_text\": false, \"generate_kwargs\": {\"do_sample\": false, \"max_new_tokens\": 24}}" \
            >"$log_dir/ours.$i"
    done
    # transformers' pipeline on the same GPU, the same model and dtype: Kaito's own path.
    docker run --rm --gpus "$gpus" -v "$cache_volume:/cache" --entrypoint python "$image" -c "
import json, torch, transformers
pipe = transformers.pipeline('text-generation', model='$model_dir', device='cuda', dtype=torch.float32)
for p in json.loads('''$prompts'''):
    out = pipe(p, do_sample=False, max_new_tokens=24, return_full_text=False)
    print(json.dumps(out[0]['generated_text']))
" >"$log_dir/theirs"
    for i in 0 1 2; do
        ours="$(python3 -c "import json,sys; s=open(sys.argv[1]).read(); c,_,b=s.partition(' '); print(json.dumps(json.loads(b)['Result']))" "$log_dir/ours.$i")"
        theirs="$(sed -n "$((i + 1))p" "$log_dir/theirs")"
        if [ "$ours" = "$theirs" ]; then
            echo "ok: prompt $i: $ours"
        else
            fail "prompt $i: ours $ours != transformers $theirs"
        fi
    done
    reply="$(chat "$beam_sampling")"
    echo "$reply"
    if [[ "$reply" == 200* ]] && [[ "$reply" == *'"backend"'*'"hf"'* ]]; then
        echo "ok: beam sampling served by the transformers backend"
    else
        fail "beam sampling with the fallback on was not served by transformers"
    fi
else
    fail "the server with the fallback on did not become healthy (log above)"
fi

say "logs in $log_dir"
if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all checks passed"
