# Serves the archives of `make kserve` (or any model store) with the same pinned torch as training.
#
# A slim Python image with Debian's Java rather than the official TorchServe image: the
# archives hold TorchScript saved by torch 2.13, and the official 0.12 images carry an older
# torch; TorchScript written by a newer torch is not guaranteed to load in an older one.
#
#   make kserve && docker build -t image-classifiers:0.1 .
#   docker run --rm -p 127.0.0.1:8085:8085 -v "$PWD/build/kserve:/mnt/models:ro" image-classifiers:0.1
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

RUN useradd --create-home model-server
USER model-server
WORKDIR /home/model-server

EXPOSE 8085 8082 7070
# KServe's ServingRuntime (build/kserve/servingruntime.yaml) passes the same arguments.
CMD ["torchserve", "--start", "--foreground", "--model-store=/mnt/models/model-store", \
     "--ts-config=/mnt/models/config/config.properties", "--log-config=/mnt/models/config/log4j2.xml"]
