# Sourced by setup_peers.sh and setup_trl.sh: make_venv DIR creates the venv DIR (if missing) with the
# pinned CPU torch installed FIRST — an unpinned torch, or a package that pulls one, brings a multi-GB CUDA build.
make_venv() {
  local venv="$1" py="${PYTHON:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
  fi
  "$venv/bin/pip" install -q "torch==2.13.0"
}
