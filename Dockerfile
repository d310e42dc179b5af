# syntax=docker/dockerfile:1
# The gateway image: the appliance package on CUDA 12 with cuDNN 9, which CTranslate2 (faster-whisper)
# needs on the GPU. It installs the package's wheel, so build one first:
#   python3 -m pip wheel --no-deps --wheel-dir dist . && docker compose -f docker-compose.gpu.yml build
# (the Ansible playbook does both). Ubuntu 24.04 for Python 3.12; the package needs 3.11 or later.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/appliance \
    PATH=/opt/appliance/bin:$PATH \
    APPLIANCE_DATA_DIR=/var/lib/appliance

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/appliance

COPY dist/ /tmp/dist/
RUN pip install /tmp/dist/appliance-*.whl && rm -rf /tmp/dist

# Compose runs the container as the host's `appliance` user (site.env), who owns the data directory;
# this one is for a plain `docker run`.
RUN groupadd --system --gid 10001 appliance \
    && useradd --system --uid 10001 --gid appliance --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
    && install -d -o appliance -g appliance /var/lib/appliance
USER appliance
WORKDIR /var/lib/appliance

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
CMD ["appliance", "serve", "--host", "0.0.0.0", "--port", "8080"]
