#!/usr/bin/env bash
# Run the whole test suite (fast tests and the `slow` ones) on the CPU, in ./.venv.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec python -m pytest -q -m "slow or not slow" "$@"
