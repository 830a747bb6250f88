#!/usr/bin/env bash
# Start (or reuse) a throwaway local PostgreSQL server for tests, installing Debian's `postgresql` if needed.
#
#   .ci/postgres.sh          install if missing, init, start, create the database; prints on stdout one line:
#                              DTRAIN_POSTGRES=Host=127.0.0.1;Port=55432;Database=dtrain_test;Username=postgres;Password=dtrain
#                            so a caller can:  export "$(.ci/postgres.sh)"
#   .ci/postgres.sh stop     stop the server started from $DTRAIN_PG_DIR
#
# Env: DTRAIN_PG_DIR (data dir, default /tmp/dtrain-pg; the `postgres` user must be able to reach it, so not under
# /root), DTRAIN_PG_PORT (default 55432). Listens on 127.0.0.1 only, trust auth, fsync off: for tests, never for data.
# All messages go to stderr; stdout carries only the DTRAIN_POSTGRES line.
set -euo pipefail

PGDIR=${DTRAIN_PG_DIR:-/tmp/dtrain-pg}
PORT=${DTRAIN_PG_PORT:-55432}
DB=dtrain_test
PASSWORD=dtrain
OSUSER=postgres

log() { echo "postgres.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$PGDIR" in /*) ;; *) die "DTRAIN_PG_DIR must be an absolute path: $PGDIR" ;; esac
case "$PGDIR" in *[[:space:]\'\"]*) die "DTRAIN_PG_DIR must not contain spaces or quotes: $PGDIR" ;; esac
[[ "$PORT" =~ ^[0-9]+$ ]] || die "DTRAIN_PG_PORT must be a number: $PORT"

# Clients must not pick up a developer's own libpq settings.
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGSERVICE PGSERVICEFILE PGOPTIONS PGSSLMODE PGPASSFILE PGDATA
export PGPASSWORD=$PASSWORD PGCONNECT_TIMEOUT=5

# The newest server install: Debian's /usr/lib/postgresql/<major>/bin, else whatever initdb is on PATH.
find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && { echo "$d"; return 0; }
  done
  if command -v initdb >/dev/null 2>&1; then
    d=$(dirname "$(readlink -f "$(command -v initdb)")")
    [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && { echo "$d"; return 0; }
  fi
  return 1
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_postgres() {
  log "PostgreSQL server not found; installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -y -qq -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  local out; out=$(mktemp)
  # apt-get update only when there are no package lists yet, or when the install fails on stale ones.
  if { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || as_root apt-get -qq update >"$out" 2>&1; } &&
     as_root "${apt[@]}" install --no-install-recommends postgresql >>"$out" 2>&1; then
    :
  else
    log "install failed; running apt-get update and retrying"
    if ! { as_root apt-get -qq update && as_root "${apt[@]}" install --no-install-recommends postgresql; } >>"$out" 2>&1; then
      cat "$out" >&2; rm -f "$out"; die "apt-get install postgresql failed"
    fi
  fi
  rm -f "$out"
  log "installed $(dpkg-query -W -f='${Package} ${Version}' "$(dpkg-query -W -f='${Depends}' postgresql | sed -E 's/^([a-z0-9.+-]+).*/\1/')" 2>/dev/null || echo postgresql)"
}

BIN=$(find_bindir || true)
if [ "${1:-}" != stop ] && [ -z "$BIN" ]; then
  install_postgres
  BIN=$(find_bindir) || die "no initdb/pg_ctl/postgres found even after installing postgresql"
fi

# Run a server program as the postgres OS user when we are root (the server refuses to run as root).
if [ "$(id -u)" -eq 0 ]; then
  if ! id -u "$OSUSER" >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash "$OSUSER"
  fi
  as_pg() { runuser -u "$OSUSER" -- "$@"; }
else
  as_pg() { "$@"; }
fi

cd /  # the postgres user may not be able to read the caller's directory

ready() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 1; }

if [ "${1:-}" = stop ]; then
  [ -n "$BIN" ] || die "no PostgreSQL install found"
  if [ -f "$PGDIR/postmaster.pid" ] && as_pg "$BIN/pg_ctl" status -D "$PGDIR" >/dev/null 2>&1; then
    as_pg "$BIN/pg_ctl" stop -D "$PGDIR" -m fast -w >&2
    log "stopped the server in $PGDIR"
  elif ready; then
    die "a server answers on 127.0.0.1:$PORT but it was not started from $PGDIR; not stopping it"
  else
    log "no server running from $PGDIR"
  fi
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [stop]"

psql_tcp() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

if ready; then
  log "reusing the server already answering on 127.0.0.1:$PORT"
else
  # A fresh data dir, unless one from an earlier run of the same major version is there to start again.
  major=$("$BIN/postgres" --version | awk '{ split($3, v, "."); print v[1] }')
  if [ "$(cat "$PGDIR/PG_VERSION" 2>/dev/null)" != "$major" ]; then
    log "initdb (PostgreSQL $major) in $PGDIR"
    rm -rf "$PGDIR"
    mkdir -p "$PGDIR"
    [ "$(id -u)" -ne 0 ] || chown "$OSUSER:" "$PGDIR"
    chmod 700 "$PGDIR"
    as_pg "$BIN/initdb" -D "$PGDIR" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 --no-sync >/dev/null
  else
    [ "$(id -u)" -ne 0 ] || chown -R "$OSUSER:" "$PGDIR"
    log "starting the existing cluster in $PGDIR"
  fi
  # 127.0.0.1 only; the unix socket lives inside the data dir (not /var/run/postgresql, which may not exist).
  opts="-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$PGDIR"
  opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  if ! as_pg "$BIN/pg_ctl" start -D "$PGDIR" -l "$PGDIR/server.log" -w -t 60 -o "$opts" >/dev/null; then
    tail -n 30 "$PGDIR/server.log" >&2 || true
    die "the server did not start (log: $PGDIR/server.log)"
  fi
  for _ in $(seq 1 60); do ready && break; sleep 0.5; done
  ready || die "the server started but does not answer on 127.0.0.1:$PORT"
  log "server running on 127.0.0.1:$PORT (data $PGDIR, log $PGDIR/server.log)"
fi

psql_tcp -d postgres -c "ALTER ROLE postgres WITH LOGIN PASSWORD '$PASSWORD'" >/dev/null
if [ "$(psql_tcp -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  psql_tcp -d postgres -c "CREATE DATABASE $DB" >/dev/null
  log "created database $DB"
fi

echo "DTRAIN_POSTGRES=Host=127.0.0.1;Port=$PORT;Database=$DB;Username=postgres;Password=$PASSWORD"
