# Sourced by .ci/run (or by hand as root: `. .ci/postgres.sh`) to give the history tests a real PostgreSQL:
# Debian's server package, a throwaway cluster under /tmp listening on 127.0.0.1 only (a free port), a
# random password, and a database the tests own (room for 300 connections: every test app keeps a
# pool). Exports QWENBOX_TEST_DATABASE_URL, which the tests read (tests/support/postgres.py); stops the
# cluster when the calling shell exits.

apt-get install -y -qq postgresql >/dev/null

QB_PG_BIN="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin | sort -V | tail -n 1)"
QB_PG_DIR="$(mktemp -d /tmp/qwen-box-pg.XXXXXX)"
QB_PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
QB_PG_PASSWORD="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
printf '%s\n' "$QB_PG_PASSWORD" >"$QB_PG_DIR/pwfile"
chown -R postgres: "$QB_PG_DIR"
chmod 700 "$QB_PG_DIR"
# scram-sha-256 for every connection, TCP on loopback only, the socket in the cluster's own folder.
runuser -u postgres -- "$QB_PG_BIN/initdb" -D "$QB_PG_DIR/data" -U qwenbox --pwfile="$QB_PG_DIR/pwfile" \
  --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$QB_PG_DIR/initdb.log"
runuser -u postgres -- "$QB_PG_BIN/pg_ctl" -D "$QB_PG_DIR/data" -l "$QB_PG_DIR/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=$QB_PG_PORT -c unix_socket_directories=$QB_PG_DIR -c fsync=off -c max_connections=300" \
  start >/dev/null
PGPASSWORD="$QB_PG_PASSWORD" "$QB_PG_BIN/psql" -q -h 127.0.0.1 -p "$QB_PG_PORT" -U qwenbox -d postgres \
  -c "CREATE DATABASE qwenbox_test"
export QWENBOX_TEST_DATABASE_URL="postgresql://qwenbox:$QB_PG_PASSWORD@127.0.0.1:$QB_PG_PORT/qwenbox_test"

qb_pg_stop() { runuser -u postgres -- "$QB_PG_BIN/pg_ctl" -D "$QB_PG_DIR/data" -m fast stop >/dev/null 2>&1 || true; }
# Keep the trap an earlier script set (podman.sh stops its service) and add this one before it.
eval "qb_prev_trap=($(trap -p EXIT))"
# shellcheck disable=SC2064  # the earlier command is expanded now, on purpose
trap "qb_pg_stop; ${qb_prev_trap[2]:-}" EXIT
