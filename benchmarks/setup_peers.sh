#!/usr/bin/env bash
# Create the peers' virtual environment (never a dependency of proxrl):
#   bash benchmarks/setup_peers.sh [VENV_DIR]      (default: ~/.cache/proxrl-peers)
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
VENV="${1:-${PROXRL_PEERS_VENV:-$HOME/.cache/proxrl-peers}}"
make_venv "$VENV"
"$VENV/bin/pip" install -q "stable-baselines3==2.9.2" "sb3-contrib==2.9.2" "gymnasium[mujoco]>=1.0" "mujoco<4"
"$VENV/bin/python" -c "import torch, stable_baselines3 as s; print('peers venv ready:', '$VENV', 'torch', torch.__version__, 'sb3', s.__version__)"
echo "use: --peer-python $VENV/bin/python"
