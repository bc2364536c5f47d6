#!/usr/bin/env bash
# The trainer on a GPU against its step benchmark (issue 14): benchmarks/gpu_trainer.py does the work.
#
#   benchmarks/gpu_trainer.sh wheels           # here, once (pip and the registry): the carried files in .whl/
#                                              # and FA4's big library wheel in two chunks, .fa4libs/{a,b}
#   benchmarks/gpu_trainer.sh [PHASE] [ARGS]   # on the GPU machine, with carry [".whl"]: install, then run
#   benchmarks/gpu_trainer.sh cpu [ARGS]       # every phase at toy size on CPU (no install): the logic
#   benchmarks/gpu_trainer.sh cpu-phase PHASE --mode cpu [ARGS]   # one of them (gpu_session.sh CPU=1)
#   benchmarks/gpu_trainer.sh stash            # on the GPU machine, call 1 of 2: keep FA4's first chunk
#   benchmarks/gpu_trainer.sh kernels [PART]   # on the GPU machine (issue 18): the attention backends and
#                                              # the fused QK-norm + RoPE kernel, tested then timed
#
# PHASE: install, shards, reference, train, resume, convert, report, or all (the default); ARGS go to
# gpu_trainer.py (--budget, --budgets, --steps, --checkpoint-every, --work, --set KEY=VALUE ...).
# A GPU call lasts at most 10 minutes: run the phases in separate calls with the same --work while
# the machine stays up, then `report`, which writes benchmarks/results/gpu_trainer_<device>.json.
#
# Carried (.whl/, under 64 MiB with the repo): DeepSpeed as a pure wheel built here
# (DS_BUILD_OPS=0: no compiled ops; the trainer passes a torch optimizer), megatron-core's cp312
# wheel, mosaicml-streaming and what it and DeepSpeed import that the GPU image lacks (its package
# list: /work/.library/device/KINDS.md), and stlpips-pytorch's AlexNet file, the perceptual trunk
# (the package itself also holds a 59 MB VGG file). atoken installs from this checkout with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
SITE=/tmp/atoken-site
PY=${PYTHON:-python3}

# Versions: ours where the GPU image has none (the same pins as this project's CPU machines), and
# megatron-core's newest cp312 wheel (docs/environment.md).
DEEPSPEED=deepspeed==0.19.8
WHEELS=(megatron-core==0.19.2 mosaicml-streaming==0.13.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 brotli==1.2.1 catalogue==2.0.10 cramjam==2.14.0
        python-snappy==0.7.3 zstd==1.5.6.1  # zstd: the newest cp312 manylinux wheel
        # flash-attn-4: model/attention.py calls its _flash_attn_fwd/_bwd, so the version is pinned;
        # einops, protobuf, cuda-bindings and typing-extensions are on the image.
        flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1
        nvidia-cutlass-dsl-libs-base==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
        quack-kernels==0.6.5)
# cuDNN's ragged SDPA (model.attention=cudnn, on the image's cuDNN; 1.8x slower than torch_varlen, NOTES.md):
# 12 MB that FA4's two calls have no room for, so only with WITH_CUDNN=1 (for `kernels step`'s cudnn row).
[ -n "${WITH_CUDNN:-}" ] && WHEELS+=(nvidia-cudnn-frontend==1.32.0)
FA4_LIBS=nvidia-cutlass-dsl-libs-cu13==4.8.1
STASH=/tmp/atoken-stash  # survives between calls while the machine stays warm (30 s after a call)

install() {  # the wheels once per machine (it stays up between calls), atoken once per call
  if [ ! -f "$SITE/.installed" ]; then
    local libs=()
    if [ -f "$STASH/fa4libs.part_a" ] && compgen -G ".fa4libs/b/*.part_b" >/dev/null; then
      local b
      b=$(ls .fa4libs/b/*.part_b)
      cat "$STASH/fa4libs.part_a" "$b" >"$STASH/$(basename "$b" .part_b)"
      libs=("$STASH/$(basename "$b" .part_b)")
      echo "FA4: the library wheel joined from its two chunks"
    else
      echo "FA4: not installed ($STASH/fa4libs.part_a or .fa4libs/b/*.part_b missing): model.attention=fa4 unavailable"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHL"/*.whl "${libs[@]}"
    touch "$SITE/.installed"
  fi
  if [ -z "${ATOKEN_INSTALLED:-}" ]; then  # gpu_session.sh installs once, then sets it for its parts
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" .
  fi
  # nvidia-cutlass-dsl puts its packages on sys.path by a .pth file, which --target installs do not run.
  export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
}

case "${1:-all}" in
  wheels)
    rm -rf "$WHL" && mkdir -p "$WHL"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$DEEPSPEED"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$WHL" "${WHEELS[@]}"
    cp "$("$PY" -c 'from atoken.model.perceptual import stlpips_file; print(stlpips_file("alex"))')" "$WHL/"
    rm -rf .fa4libs && mkdir -p .fa4libs/a .fa4libs/b
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .fa4libs "$FA4_LIBS"
    libs=$(ls .fa4libs/*.whl)
    # 61 MiB + this checkout (1.4 MB) in call 1; the rest (~28 MB) + .whl (~33 MB) in call 2: each < 64 MiB.
    head -c 61M "$libs" >.fa4libs/a/fa4libs.part_a
    tail -c +$((61 * 1024 * 1024 + 1)) "$libs" >".fa4libs/b/$(basename "$libs").part_b"
    rm "$libs"
    du -sh "$WHL" .fa4libs/a .fa4libs/b && ls "$WHL" .fa4libs/*
    ;;
  stash)  # the first of two calls: keep FA4's first chunk on the machine for the next call's install
    mkdir -p "$STASH" && cp .fa4libs/a/fa4libs.part_a "$STASH/" && ls -l "$STASH"
    ;;
  install)
    install
    "$PY" -c "import atoken.training.train, deepspeed, streaming, megatron.core; print('installed: deepspeed', deepspeed.__version__)"
    "$PY" -c "from atoken.model.attention import _fa4, _unavailable_reason as r; print('fa4:', r('fa4', None) or 'importable')"
    ;;
  cpu)
    shift
    exec "$PY" benchmarks/gpu_trainer.py all --mode cpu "$@"
    ;;
  cpu-phase)  # one phase on CPU, no install (gpu_session.sh with CPU=1)
    shift
    exec "$PY" benchmarks/gpu_trainer.py "$@"
    ;;
  kernels)  # PART: check, step, budget or all (one 10-minute call may not hold all: so400m compiles)
    install
    part=${2:-all}
    step() { "$PY" benchmarks/train_step.py --models so400m --compile --no-padded --tokens "$1" --tag "$2" \
               --out "benchmarks/results/train_step_${2}.json" \
               --trunk-weights "$WHL/alex_shift_tolerant.pth" "${@:3}"; }
    if [ "$part" = check ] || [ "$part" = all ]; then
      # Values and gradients first (packed mixed lengths, head_dim 72; the kernel against the eager path).
      "$PY" -m pytest -q -m gpu tests/unit/test_model.py tests/unit/test_fused_qk_rope.py
      "$PY" benchmarks/attention.py
    fi
    if [ "$part" = step ] || [ "$part" = all ]; then  # each change against the baseline, in this call
      step 16384 k16_torch_varlen --attention torch_varlen
      step 16384 k16_torch_varlen_fused --attention torch_varlen --fused-qk-rope
      step 16384 k16_cudnn --attention cudnn  # 1.8x slower than torch_varlen alone (benchmarks/NOTES.md)
    fi
    if [ "$part" = budget ] || [ "$part" = all ]; then
      step 32768 k32_torch_varlen_ac --attention torch_varlen --activation-checkpointing
      step 65536 k64_torch_varlen_ac --attention torch_varlen --activation-checkpointing
    fi
    ;;
  *)
    phase=${1:-all}
    shift || true
    install
    exec "$PY" benchmarks/gpu_trainer.py "$phase" --mode gpu --trunk-weights "$WHL/alex_shift_tolerant.pth" "$@"
    ;;
esac
