#!/usr/bin/env bash
# The property tests (every @given test, both backends) with many more examples under fresh random
# seeds: run before a kernel change lands (CI runs them derandomized, with few examples).
#   bash tests/long_properties.sh [SCALE] [pytest args...]    SCALE multiplies each test's examples (20)
# A failure prints hypothesis's reproduction blob (@reproduce_failure) and the falsifying example.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-20}
shift || true
unset CI # CI=... derandomizes hypothesis (tests/conftest.py)
export PYKD_EXAMPLES_SCALE=$scale TRITON_INTERPRET=1
exec python -m pytest -q -p no:cacheprovider -m hypothesis "$@" tests
