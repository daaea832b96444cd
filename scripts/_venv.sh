# Sourced by the other scripts: make sure ./.venv exists with the project installed, and activate it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CASCADE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import codec, pytest" 2>/dev/null || [ "$ROOT/pyproject.toml" -nt "$VENV/.installed" ]; then
    echo "[setup] installing cascade-codec and its dependencies into $VENV (first time: a few minutes)"
    python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
    python -m pip install -q -e "$ROOT[dev]" 2>&1 | grep -v -i warning || true
    python -c "import codec, pytest" && touch "$VENV/.installed"
fi
