# faceloop backend and worker image (CPU or CUDA: torch 2.14.1 wheels carry CUDA).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 VAR_DIR=/var/lib/faceloop \
    HOME=/home/faceloop YOLO_CONFIG_DIR=/var/lib/faceloop/ultralytics
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
# non-root (issue 9 §7): a fixed uid/gid so a bind-mounted volume can be chowned to it (10001:10001)
RUN groupadd --system --gid 10001 faceloop \
    && useradd --system --uid 10001 --gid faceloop --home-dir /home/faceloop --create-home --shell /usr/sbin/nologin faceloop \
    && install -d -o faceloop -g faceloop -m 0700 /var/lib/faceloop
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY ml_worker ./ml_worker
COPY facemodels ./facemodels
COPY modelstore ./modelstore
COPY label_config ./label_config
COPY models ./models
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install .
# the code and shipped models stay root-owned and read-only to the service user
USER faceloop:faceloop
VOLUME ["/var/lib/faceloop"]
EXPOSE 9090
CMD ["uvicorn", "backend.main:app", "--host", "0.0.0.0", "--port", "9090"]
