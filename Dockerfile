FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: a code change does not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 coins \
    && mkdir /data \
    && chown coins:coins /data

COPY app.py coingecko_client.py worker.py store.py fake_coingecko.py demo.py ./

USER coins

# gunicorn binds 0.0.0.0:$PORT when PORT is set and no --bind is given.
ENV HOST=0.0.0.0 \
    PORT=5000 \
    COINS_DB=/data/coins.db
VOLUME ["/data"]
EXPOSE 5000

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '5000'), timeout=4)"

# One process: the queue, the worker and the store live in it. Threads serve requests.
CMD ["gunicorn", "--workers", "1", "--threads", "8", "--access-logfile", "-", "app:create_app()"]
