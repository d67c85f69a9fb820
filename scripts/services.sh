#!/usr/bin/env bash
# Make sure Redis (REDIS_URL, default 127.0.0.1:6379) and, for the database tests, the local PostgreSQL
# server are running; start them when installed but stopped, install them with apt-get when missing
# and we are root. Idempotent.
set -euo pipefail

redis_up() { redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379/0}" ping >/dev/null 2>&1; }
pg_up() { pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: $* not installed; install it (Debian: sudo apt-get install $*)" >&2; return 1
  fi
}

if ! redis_up; then
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  echo "==> starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "error: Redis did not start" >&2; exit 1; }
fi
echo "Redis is up"

if [ "${SKIP_POSTGRES:-0}" != 1 ] && ! pg_up; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  echo "==> starting PostgreSQL"
  version=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
  pg_ctlcluster "$version" main start || service postgresql start
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
  pg_up || { echo "error: PostgreSQL did not start" >&2; exit 1; }
  # the tests connect as postgres over TCP without a password (trust), as on this project's machines
fi
[ "${SKIP_POSTGRES:-0}" = 1 ] || echo "PostgreSQL is up"
