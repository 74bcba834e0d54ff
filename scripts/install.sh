#!/usr/bin/env bash
# Creates the virtual environment and installs llmkd with its dev extras, keeping a CPU torch.
# Usage: scripts/install.sh PYTHON VENV
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
torch_version=${LLMKD_TORCH_VERSION:-2.13.0}

if existing=$("$python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
  echo "llmkd: reusing the torch $existing that $python already has"
  "$python" -m venv --system-site-packages "$venv"
  torch_version=$existing
else
  "$python" -m venv "$venv"
fi
echo "torch==$torch_version" > "$venv/constraints.txt"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # Set PIP_INDEX_URL / PIP_FIND_LINKS to a CPU wheel source on machines that would otherwise get CUDA.
  "$venv/bin/python" -m pip install -q "torch==$torch_version"
fi
"$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -e ".[dev]"
"$venv/bin/python" -c "import torch, transformers; print('llmkd: torch', torch.__version__, '| transformers', transformers.__version__)"
