#!/usr/bin/env bash
# Create the peers' virtual environment (never a dependency of proxrl):
#   bash benchmarks/setup_peers.sh [VENV_DIR]      (default: ~/.cache/proxrl-peers)
# torch is pinned and installed FIRST: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
VENV="${1:-${PROXRL_PEERS_VENV:-$HOME/.cache/proxrl-peers}}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q "stable-baselines3==2.9.2" "sb3-contrib==2.9.2" "gymnasium[mujoco]>=1.0" "mujoco<4"
"$VENV/bin/python" -c "import torch, stable_baselines3 as s; print('peers venv ready:', '$VENV', 'torch', torch.__version__, 'sb3', s.__version__)"
echo "use: --peer-python $VENV/bin/python"
