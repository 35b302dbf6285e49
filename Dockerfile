# The images from one file, all on UBI 9 Python, non-root, group-0 writable (OpenShift's arbitrary UID);
# `make images` builds the three the OperatorHub bundle lists:
#   docker build --target operator -t quay.io/modelpress/operator:0.1.0 .
#   docker build --target runner   -t quay.io/modelpress/runner:0.1.0 .          # CPU torch
#   docker build --target runner --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg VLLM_VERSION=0.32.0 \
#                -t quay.io/modelpress/runner-cuda:0.1.0 .                        # CUDA torch and vLLM, for GPU nodes
# Nothing secret is baked in: credentials reach pods only as Secret references at run time.
FROM registry.access.redhat.com/ubi9/python-311:latest AS base
USER 1001
WORKDIR /opt/app-root/src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --chown=1001:0 pyproject.toml README.md ./modelpress/
COPY --chown=1001:0 runner/ ./modelpress/runner/
COPY --chown=1001:0 operator/ ./modelpress/operator/
COPY --chown=1001:0 tests/requirements.txt ./modelpress/tests/requirements.txt
COPY --chown=1001:0 tests/operator/requirements.txt ./modelpress/tests/operator/requirements.txt

# The operator: its own requirements (kopf, the Kubernetes client, pydantic), then the project
# without its dependencies, so no torch.
FROM base AS operator
RUN pip install -r modelpress/operator/requirements.txt \
 && pip install --no-deps ./modelpress \
 && fix-permissions /opt/app-root -P
LABEL name="modelpress-operator" version="0.1.0" \
      summary="ModelPress operator: CompressionJob resources to runner Jobs" \
      description="Validates CompressionJobs, runs the ModelPress runner as Kubernetes Jobs, and reports progress and results in their status." \
      io.k8s.display-name="ModelPress operator" io.openshift.tags="modelpress,llm,quantization,operator"
USER 1001
ENTRYPOINT ["modelpress-operator"]
CMD ["--all-namespaces"]

# The runner: torch first from the chosen index (CPU by default; PyPI, whose Linux x86_64 torch wheels
# are the CUDA builds with the CUDA libraries as nvidia-* wheels, for GPU nodes), then the project and
# its pinned stack. Everything is installed now: clusters may be disconnected.
# With VLLM_VERSION (the CUDA image), vLLM goes into a venv of its own (it pins torch, transformers and
# compressed-tensors versions of its own) and MODELPRESS_VLLM_PYTHON names its python, for the jobs
# that set spec.evaluation.servable; without it the variable stays empty and such jobs are refused.
FROM base AS runner
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VLLM_VERSION=
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install ./modelpress \
 && if [ -n "${VLLM_VERSION}" ]; then python -m venv /opt/app-root/vllm \
      && /opt/app-root/vllm/bin/python -m pip install "vllm==${VLLM_VERSION}"; fi \
 && fix-permissions /opt/app-root -P
ENV HOME=/opt/app-root/src HF_HUB_DISABLE_TELEMETRY=1 \
    MODELPRESS_VLLM_PYTHON=${VLLM_VERSION:+/opt/app-root/vllm/bin/python}
LABEL name="modelpress-runner" version="0.1.0" \
      summary="ModelPress runner: one CompressionJob from spec to compressed model" \
      description="Fetches a model, calibrates and compresses it into a compressed-tensors checkpoint, evaluates and uploads it." \
      io.k8s.display-name="ModelPress runner" io.openshift.tags="modelpress,llm,quantization,vllm"
USER 1001
ENTRYPOINT ["python", "-m", "modelpress.runner"]
