#!/bin/sh
# Entry point of the alsub image.
#   api     the HTTP API only (workers run as separate containers): alsub serve --workers 0
#   worker  a Celery worker for the distributed deployment:          alsub worker
#   serve   the embedded all-in-one service (API + local worker, no Redis needed)
#   *       any other command, run as given (e.g. `alsub subtract ...`, `celery ...`)
set -eu

# Never serve without authentication by accident: with no ALSUB_TOKENS the API roles
# generate a random token once, keep it (0600) in the data directory and use it after.
ensure_token() {
    if [ -z "${ALSUB_TOKENS:-}" ]; then
        token_file="${ALSUB_DATA_DIR:-/data}/api-token"
        if [ ! -s "$token_file" ]; then
            (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$token_file")
            echo "alsub: ALSUB_TOKENS not set: generated a bearer token in $token_file" >&2
        fi
        ALSUB_TOKENS="$(cat "$token_file")"
        export ALSUB_TOKENS
        echo "alsub: API tokens from $token_file (read it there; set ALSUB_TOKENS to choose)" >&2
    fi
}

role="${1:-api}"
case "$role" in
    api)
        shift || true
        ensure_token
        exec alsub serve --host 0.0.0.0 --port "${ALSUB_PORT:-8000}" --workers 0 "$@"
        ;;
    worker)
        shift
        exec alsub worker "$@"
        ;;
    serve)
        shift
        ensure_token
        exec alsub serve --host 0.0.0.0 --port "${ALSUB_PORT:-8000}" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
