#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0
# Triton kernels run on CPU tensors through the interpreter when there is no GPU.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export TRITON_INTERPRET=1
fi
if [ -f .ci/compile_cuda.sh ]; then
    bash .ci/compile_cuda.sh
fi
# Every Triton kernel compiled for sm_90 by Triton's own compiler and ptxas (no GPU; not interpreted).
env -u TRITON_INTERPRET python .ci/compile_triton.py
python -m pytest -q -p no:cacheprovider tests "$@"
# The engine's plain-PyTorch elementwise path, which the native extension replaces when built.
SOAP_KERNELS_NATIVE_OPS=0 python -m pytest -q -p no:cacheprovider tests/test_engine.py
