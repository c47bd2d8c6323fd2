# Sourced (from the repository root) by launch/test.sh and launch/quickstart.sh: creates
# .venv if missing and installs the package with its test extra, again only when
# setup.py changed since the last install. PYTHON: the interpreter that creates .venv.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  command -v "$PYTHON" >/dev/null || {
    echo "$(basename "$0"): no $PYTHON found: install Python 3.11+ or set PYTHON" >&2
    exit 2
  }
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.imagen_jax_installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "installing imagen-jax into .venv (first run, or setup.py changed; a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
