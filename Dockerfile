FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONMALLOC=malloc \
    MALLOC_ARENA_MAX=2

WORKDIR /app

# Dependencies first, in their own layer: a code change does not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 coins \
    && mkdir /data \
    && chown coins:coins /data

COPY *.py ./
COPY web/ ./web/
COPY stores/ ./stores/

USER coins

ENV HOST=0.0.0.0 \
    PORT=5000 \
    COINS_DB=/data/coins.db
VOLUME ["/data"]
EXPOSE 5000

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('PORT', '5000'), timeout=4)"

# gunicorn, started by app.py (server.py): one worker process holds the queue, the worker and
# the store; its threads serve requests. SIGTERM (docker stop) ends it cleanly with status 0.
# PYTHONMALLOC above: the C library's allocator gives freed memory back (memory.py); without it
# app.py would exec itself once to get it.
CMD ["python", "app.py"]
