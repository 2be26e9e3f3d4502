#!/usr/bin/env bash
# Every GPU figure kava reports, in one run on one CUDA GPU (each step has its own time limit;
# about 13 minutes at most, so where one call may take 10 minutes, give the steps in two calls):
#
#   bash bench/gpu_checks.sh [OUT]              # logs in OUT (default data_cache/gpu_checks)
#   KAVA_WHEELS=DIR bash bench/gpu_checks.sh    # first install the wheels in DIR (offline machines)
#   bash bench/gpu_checks.sh OUT extract,gpu_memory_latent    # only the steps named (below)
#   bash bench/gpu_checks.sh OUT latent         # instead: the latent-student capacity pilot (below)
#
# Steps, by name:
# extract: stage 1 / forward-only on CUDA: tiny fp32, tiny NF4 and the Qwen2.5-1.5B shape in
#    bf16 (the gather capture path, the GPU default)
# gpu_memory, gpu_memory_tinyllama, gpu_memory_latent: the stage-2 peak-memory estimate beside
#    torch's measured peak at the seed's setting, at the original setup's (a Qwen2-7B-shaped
#    teacher, a TinyLlama-1.1B-shaped student), and for a latent Qwen2.5-0.5B-shaped student (8
#    latent steps; with and without checkpointing)
# train: the stage-2 step from an int4 cache over the float16 one (tiny models and the seed's
#    shapes), and the offline / online step ratio with the teacher in NF4, as the seed ran it
#
# latent: bench/pilots/latent_capacity.yaml (KaVa's K/V loss on latent students of 6.4M and 36M
#    parameters; not a figure of the list above, a question the CPU cannot answer); at most 9.5
#    minutes a call, and the same command again goes on where it stopped; results-latent_capacity.md
#    and the runs' logs are copied to OUT. It needs matplotlib too (the report's plot).
#
# It needs torch with CUDA, transformers, bitsandbytes (CUDA build), safetensors, h5py, peft,
# psutil, pyyaml and xxhash importable by PYTHON (default python3); the repository root is put on
# PYTHONPATH. KAVA_WHEELS names a folder of wheels (say transformers and bitsandbytes at the
# versions of constraints.txt) installed with pip --no-index --no-deps into a private folder.
set -u -o pipefail
out=${1:-data_cache/gpu_checks}
py=${PYTHON:-python3}
mkdir -p "$out"
if [ -n "${KAVA_WHEELS:-}" ]; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$KAVA_WHEELS"/*.whl || { echo "error: installing the wheels in $KAVA_WHEELS failed"; exit 1; }
    export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

only=${2:-figures}
steps=extract,gpu_memory,gpu_memory_tinyllama,gpu_memory_latent,train
if [ "$only" != figures ] && [ "$only" != latent ]; then
    for name in ${only//,/ }; do
        case ",$steps," in *,"$name",*) ;; *) echo "error: no step '$name'; the steps: $steps (or latent)"; exit 2 ;; esac
    done
fi
step() {    # step NAME SECONDS ARGS...: run PYTHON ARGS with a time limit, log to OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    case ",$only," in ,figures,|*,"$name",*) ;; *) return 0 ;; esac
    echo "== $name (at most $limit s): $py $*"
    timeout "$limit" "$py" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$py" -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$out/gpu.txt"
if [ "$only" = latent ]; then
    root=data_cache/bench_learn_gpu
    step latent 570 bench/bench_learn.py --prereg bench/pilots/latent_capacity.yaml --root "$root" \
        --phase validation --allow-uncommitted
    cp "$root"/results-latent_capacity.* "$out"/ 2>/dev/null
    for arm in latent_mid kava_mid latent_big kava_big; do
        cp "$root/validation/$arm/seed-0/seed-0/metrics.jsonl" "$out/metrics-$arm.jsonl" 2>/dev/null
    done
    echo "logs in $out"
    exit 0
fi
step extract 180 bench/bench_extract.py --device cuda --cases tiny-fp32,tiny-nf4,qwen2.5-1.5b-fp32 --repeats 3
step gpu_memory 120 bench/bench_gpu_memory.py --device cuda
step gpu_memory_tinyllama 150 bench/bench_gpu_memory.py --device cuda --pair qwen2-7b-tinyllama
step gpu_memory_latent 120 bench/bench_gpu_memory.py --device cuda --latent 8
step train 240 bench/bench_train.py --device cuda --parts int4,int4-real,online --online-teacher nf4 --steps 40
echo "logs in $out"
