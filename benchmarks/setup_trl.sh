#!/usr/bin/env bash
# Create TRL's virtual environment for benchmarks/rlhf_vs_trl.py (never a dependency of proxrl):
#   bash benchmarks/setup_trl.sh [VENV_DIR]      (default: ~/.cache/proxrl-trl)
# trl 1.12.0 is the newest release that still ships trl.experimental.ppo.PPOTrainer.
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
VENV="${1:-${PROXRL_TRL_VENV:-$HOME/.cache/proxrl-trl}}"
make_venv "$VENV"
"$VENV/bin/pip" install -q "trl==1.12.0"
"$VENV/bin/python" -c "import torch, trl, transformers; from trl.experimental.ppo import PPOTrainer; print('TRL venv ready:', '$VENV', 'torch', torch.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__)"
echo "use: --trl-python $VENV/bin/python"
