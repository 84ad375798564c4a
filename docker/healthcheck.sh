#!/bin/sh
# Health of an alsub container, whatever its role (see entrypoint.sh):
#   worker        its Celery worker answers a ping (python -m worker.health)
#   api / serve   the API answers /healthz
set -eu
if tr '\0' ' ' < /proc/1/cmdline | grep -q "alsub worker"; then
    exec python -m worker.health 5
fi
exec python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ALSUB_PORT', '8000'), timeout=4)"
