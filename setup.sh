#!/usr/bin/env bash
# Fresh-machine set-up: creates .venv/ (Python 3.11) and installs this project into it (editable) with the
# exact versions in constraints.txt. Idempotent: rerunning only installs what changed.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3.11}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$(grep -m1 '^uv==' constraints.txt)"
.venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -c constraints.txt -e '.[test]'
echo "Installed into $(pwd)/.venv (CLI: .venv/bin/alignet)" >&2
