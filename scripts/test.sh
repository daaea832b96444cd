#!/usr/bin/env bash
# Run the whole test suite on the CPU, in ./.venv: the fast tests (what plain `pytest` runs), then the `slow` ones.
# Both in random order (pytest-randomly; the seed is printed, TEST_SEED=N repeats an order) and in two pytest-xdist
# workers, a test module per worker (module fixtures are built once). Extra arguments go to both runs, e.g.
# `bash scripts/test.sh tests/test_images.py`. See docs/testing.md.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
seed="${TEST_SEED:-$RANDOM}"
echo "random order: TEST_SEED=$seed"
status=0
for selection in "not slow" "slow"; do
    echo "== pytest -m \"$selection\""
    code=0
    python -m pytest -q -n 2 --dist loadscope --randomly-seed="$seed" -m "$selection" "$@" || code=$?
    # 5: no test selected (e.g. a file without slow tests was named), not a failure
    if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then status=$code; fi
done
exit "$status"
