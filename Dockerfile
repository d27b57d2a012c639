# The `tuner` CLI in a slim image. Build and try it from the repository root:
#
#   docker build -t tuner:0.1.0 .
#   docker run --rm -v "$PWD/runs:/work" tuner:0.1.0 grid lr-batch --epochs 1 --subset 2000
#
# MNIST (tuner/datasets/mnist.npz) and the study files ship inside the package: nothing is downloaded at run
# time. Without TUNER_STORAGE the study goes to /work/tuner.db, so mount /work to keep it. Many workers share
# one study through PostgreSQL instead: see deploy/README.md.

# Stage 1: build the wheel and install it with its dependencies into a virtualenv. Only the virtualenv is
# carried over, so the source tree, pip's build environment and any build leftovers stay out of the image.
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/tuner

WORKDIR /src
# pyproject.toml names README.md as the readme, and the wheel takes studies/ in as tuner/studies.
COPY pyproject.toml README.md ./
COPY studies ./studies
COPY tuner ./tuner
RUN /opt/tuner/bin/pip install --no-cache-dir .

# Stage 2: the same base image (the virtualenv's python links to its interpreter), the virtualenv, a user.
FROM python:3.11-slim

LABEL org.opencontainers.image.title="tuner" \
      org.opencontainers.image.description="Hyperparameter tuning of Keras recurrent nets on MNIST with Optuna" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/tuner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=3

# A numeric UID/GID, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 tuner \
    && useradd --system --uid 10001 --gid tuner --create-home --home-dir /home/tuner \
       --shell /usr/sbin/nologin tuner \
    && mkdir /work \
    && chown tuner:tuner /work

COPY --from=build /opt/tuner /opt/tuner

# The data directory: the default SQLite file tuner.db and any report written with -o land here.
WORKDIR /work
USER 10001:10001

ENTRYPOINT ["tuner"]
CMD ["--help"]
