#!/bin/sh
# Entry point of the alsub image.
#   api     the HTTP API only (workers run as separate containers): alsub serve --workers 0
#   worker  a Celery worker for the distributed deployment:          alsub worker
#   serve   the embedded all-in-one service (API + local worker, no Redis needed)
#   *       any other command, run as given (e.g. `alsub subtract ...`, `celery ...`)
set -eu

role="${1:-api}"
case "$role" in
    api)
        shift || true
        exec alsub serve --host 0.0.0.0 --port "${ALSUB_PORT:-8000}" --workers 0 "$@"
        ;;
    worker)
        shift
        exec alsub worker "$@"
        ;;
    serve)
        shift
        exec alsub serve --host 0.0.0.0 --port "${ALSUB_PORT:-8000}" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
