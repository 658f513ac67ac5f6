# faceloop backend and worker image (CPU or CUDA: torch 2.14.1 wheels carry CUDA).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 VAR_DIR=/var/lib/faceloop
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY ml_worker ./ml_worker
COPY label_config ./label_config
COPY models ./models
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install .
EXPOSE 9090
CMD ["uvicorn", "backend.main:app", "--host", "0.0.0.0", "--port", "9090"]
