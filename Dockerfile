# CharRNN: the HTTP service (default command) and the training CLI, on a PyTorch base image.
#
#   docker build -t charrnn .                                        # CUDA (the default base)
#   docker build --build-arg BASE_IMAGE=<image with CPU torch> -t charrnn:cpu .
#
# BASE_IMAGE contract: `python` (>= 3.11) on PATH with torch >= 2.6, < 2.14 importable, as in the
# official pytorch/pytorch images; and, for the builder stage, root with apt-get (Debian or
# Ubuntu, mirrors reachable) to install the compiler of the native kernels. The project goes into its own venv at /opt/charrnn that sees
# the base's site-packages, and torch is pinned to the base's exact version while installing, so
# torch (with its CUDA libraries) is reused, never downloaded again; a base with a torch outside
# the range fails the build instead of pulling a second torch. The CPU base used in CI is made by
# scripts/make_cpu_base.sh.
#
# Extra CA for the build (a TLS-intercepting proxy between the build and PyPI): put the bundle at
# docker-build-ca.pem in the build context. Only the builder stage reads it; the runtime stage
# copies nothing but the finished venv out of the builder, so neither the file nor any trace of
# it (layer, ENV, history) is in the final image. BuildKit's `--secret` would do the same, but
# it is not available with the legacy builder that CI uses.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------- builder --
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# The app venv, with a .pth file naming the base interpreter's site-packages (conda's, or the
# base's own venv), so that torch and whatever else the base ships count as installed.
RUN python -m venv /opt/charrnn \
    && python -c 'import os, site; print("\n".join(p for p in site.getsitepackages() if os.path.isdir(p)))' \
        > "$(/opt/charrnn/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base-image.pth" \
    && python -c 'from importlib.metadata import version; print("torch==" + version("torch"))' \
        > /tmp/torch-pin.txt

COPY pyproject.toml README.m[d] ./
COPY charrnn/ charrnn/
COPY training/ training/
COPY app/ app/
# The glob matches nothing when there is no CA file; pyproject.toml keeps the COPY valid.
COPY pyproject.toml docker-build-ca.pe[m] /tmp/build-ca/

# torchrun here is the base's own launcher run by the app venv's python, so that the workers it
# starts (with its interpreter) can import the project.
RUN if [ -s /tmp/build-ca/docker-build-ca.pem ]; then export PIP_CERT=/tmp/build-ca/docker-build-ca.pem; fi \
    && /opt/charrnn/bin/pip install --no-cache-dir --constraint /tmp/torch-pin.txt . \
    && /opt/charrnn/bin/pip uninstall --yes --quiet pip \
    && printf '%s\n' '#!/opt/charrnn/bin/python' 'import sys' 'from torch.distributed.run import main' \
        'sys.exit(main())' > /opt/charrnn/bin/torchrun \
    && chmod 755 /opt/charrnn/bin/torchrun \
    && /opt/charrnn/bin/python -c 'import torch, app.main, training.fit; print("torch", torch.__version__)'

# The native kernels (charrnn/native.py: the int8 LSTM, the sampler), prebuilt with the base's own
# distribution compiler, so that the runtime stage loads them with no compiler of its own. Their
# build flags are portable (no -march), so the image runs on any x86-64 CPU.
ENV CHARRNN_NATIVE_DIR=/opt/charrnn/native
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && PATH=/opt/charrnn/bin:${PATH} /opt/charrnn/bin/python -m charrnn.native \
    && find /opt/charrnn/native -type f ! -name '*.so' -delete

# Make the checkpoints world-readable whatever their mode in the context (a umask of 077, or a
# checkpoint written owner-only by an older version), so the runtime stage gets them root-owned
# and read-only for the service user, in a single layer.
COPY models/ /src/models/
RUN chmod -R u=rwX,go=rX /src/models

# ---------------------------------------------------------------------------------- runtime --
FROM ${BASE_IMAGE} AS runtime
ARG APP_UID=10001

RUN useradd --uid "${APP_UID}" --user-group --no-log-init --create-home --shell /bin/sh charrnn

COPY --from=builder /opt/charrnn /opt/charrnn
WORKDIR /app
# The shipped checkpoints, owned by root and read-only for the service. Mount a folder over
# /app/models to serve others without a rebuild.
COPY --from=builder /src/models/ /app/models/

ENV PATH=/opt/charrnn/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CHARRNN_NATIVE_DIR=/opt/charrnn/native \
    CHARRNN_HOST=0.0.0.0 \
    CHARRNN_PORT=8000 \
    CHARRNN_MODELS=alice=/app/models/alice.pt

USER ${APP_UID}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CHARRNN_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "app"]
