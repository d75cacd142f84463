#!/usr/bin/env bash
# Create bench/.venvs/moe-peft with MoE-PEFT 2.0.2 for the CPU training anchor
# (bench/anchors/moe_peft_train.py). Idempotent: exits at once when the venv already
# imports the pinned versions. Usage (from anywhere):  bash bench/anchors/setup_moe_peft.sh
#
# Why it looks like this:
# - moe_peft==2.0.2 pins torch<2.6 and transformers<4.47. PyPI's only Linux x86_64 torch
#   2.5.1 wheel is the CUDA 12.4 build, and it does NOT import without the nvidia-* wheels
#   (torch/__init__ preloads libcublas, libcudnn, ... and raises "libcublas.so.*[0-9] not
#   found"), so the 12 nvidia-*-cu12 wheels it pins are installed (~2.8 GB) - with
#   --no-deps, which skips triton (GPU-only, ~200 MB). No GPU is needed at run time.
# - moe_peft and accelerate are installed with --no-deps so pip never re-resolves torch
#   (that would pull triton). moe_peft's other declared deps (scikit-learn, tiktoken,
#   sentencepiece) are not imported by `import moe_peft` or the LLaMA path, so they are
#   skipped. accelerate is needed by transformers for from_pretrained(device_map=...).
# - Everything else is pinned to the versions this was measured with.
# pip prints "ERROR: pip's dependency resolver ... torch 2.5.1 requires triton / moe-peft
# requires scikit-learn ..." while installing: expected, the final import check decides.
# Disk: ~4.7 GB. Time: ~3 min on a fresh machine with an empty pip cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${MOE_PEFT_VENV:-$ROOT/bench/.venvs/moe-peft}"
PYTHON="${PYTHON:-python3}"

check() {
    [ -x "$VENV/bin/python" ] || return 1
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md
want = {"moe_peft": "2.0.2", "torch": "2.5.1", "transformers": "4.46.3", "accelerate": "1.1.1"}
for pkg, ver in want.items():
    got = md.version(pkg)
    assert got.split("+")[0] == ver, (pkg, got)
import torch, moe_peft  # noqa: F401  (torch import fails if an nvidia lib is missing)
torch.ones(2, 2) @ torch.ones(2, 2)
EOF
}

if check; then
    echo "moe-peft venv OK: $VENV"
    exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# 1. torch 2.5.1 (CUDA 12.4 build from PyPI) and exactly the nvidia libs it loads at import.
"${PIP[@]}" --no-deps \
    torch==2.5.1 \
    nvidia-cublas-cu12==12.4.5.8 nvidia-cuda-cupti-cu12==12.4.127 \
    nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cuda-runtime-cu12==12.4.127 \
    nvidia-cudnn-cu12==9.1.0.70 nvidia-cufft-cu12==11.2.1.3 nvidia-curand-cu12==10.3.5.147 \
    nvidia-cusolver-cu12==11.6.1.9 nvidia-cusparse-cu12==12.3.1.170 \
    nvidia-nccl-cu12==2.21.5 nvidia-nvjitlink-cu12==12.4.127 nvidia-nvtx-cu12==12.4.127

# 2. moe_peft and accelerate without their (torch-pulling) dependency resolution.
"${PIP[@]}" --no-deps moe_peft==2.0.2 accelerate==1.1.1

# 3. The pure-Python / non-torch deps, pinned (none of these depends on torch).
"${PIP[@]}" \
    typing_extensions==4.16.0 filelock==4.3.1 sympy==1.13.1 mpmath==1.3.0 networkx==3.6.1 \
    Jinja2==3.1.6 MarkupSafe==3.0.4 fsspec==2026.6.0 psutil==7.2.2 \
    transformers==4.46.3 tokenizers==0.20.3 safetensors==0.8.0 huggingface_hub==0.36.2 \
    numpy==2.4.6 regex==2026.11.19 PyYAML==6.0.4 packaging==26.4 tqdm==4.70.1 \
    requests==2.34.2 datasets==5.0.1 evaluate==0.4.6

if ! check; then
    echo "moe-peft venv at $VENV does not import; see above" >&2
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import torch, moe_peft" || true
    exit 1
fi
echo "moe-peft venv ready in $(( $(date +%s) - start ))s: $VENV"
