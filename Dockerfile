# One image for every part: `lorafleet serve`, `lorafleet gateway`, `lorafleet operator`.
#   GPU (default):  docker build -t lorafleet .
#   CPU:            docker build -t lorafleet:cpu --build-arg BASE=ubuntu:24.04 --build-arg TORCH_SPEC=torch==2.13.0 .
# Build and runtime stages share one base so the virtual environment's interpreter link stays valid.
ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE} AS python
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM python AS build
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
WORKDIR /src
RUN python3 -m venv /opt/lorafleet
COPY pyproject.toml README.md ./
COPY lorafleet ./lorafleet
COPY server ./server
COPY gateway ./gateway
COPY operator ./operator
COPY crds ./crds
# The image installs the wheel (as tests/test_wheel_install.py does), not the source tree.
RUN /opt/lorafleet/bin/pip install --no-cache-dir ${TORCH_SPEC} \
 && /opt/lorafleet/bin/pip wheel --no-cache-dir --no-deps -w /wheels . \
 && /opt/lorafleet/bin/pip install --no-cache-dir "$(ls /wheels/lorafleet-*.whl)[gpu]"

FROM python
RUN useradd --uid 10001 --create-home --home-dir /home/lorafleet lorafleet \
 && mkdir -p /data && chown 10001 /data
COPY --from=build /opt/lorafleet /opt/lorafleet
ENV PATH=/opt/lorafleet/bin:$PATH \
    LORAFLEET_HOME=/data \
    HF_HOME=/data/hf
USER 10001
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["lorafleet"]
CMD ["--help"]
