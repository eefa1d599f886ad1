# The mirrord agent image: `mirrord-agent` (and the node agent of the Helm chart's DaemonSet)
# with the tools it runs inside the target's network namespace.
#
# Build from the repository root (the context must contain pyproject.toml, setup.py, src/,
# native/):
#   docker build -f docker/agent.Dockerfile -t ghcr.io/mirrord-python/mirrord-agent:$(python3 -c 'import mirrord; print(mirrord.__version__)') .
# The tag must be the package version: `mirrord` uses <repository>:<its own version> unless
# `agent.image` says otherwise (see docs/kubernetes.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a wheel, with the layer's native library compiled (setup.py needs gcc)
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY native ./native
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/mirrord-*.whl

# ---- runtime: the agent and what it calls
FROM ${PYTHON_IMAGE}
# iptables/nftables: steal rules; libpcap0.8: scapy's BPF compiler (mirror);
# iproute2 and util-linux (nsenter): namespace plumbing.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      iptables nftables libpcap0.8 iproute2 util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels mirrord \
 && rm -rf /wheels
# The agent runs as root: it enters the target's namespaces (SYS_ADMIN, SYS_PTRACE) and edits
# its firewall rules (NET_ADMIN); the pod spec grants only those capabilities.
USER 0
ENV PYTHONUNBUFFERED=1
CMD ["mirrord-agent", "--help"]
