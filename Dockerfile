# The worker container of the Beam stages on Dataflow (README, "Running on a cluster"): Beam's Python 3.11 SDK
# image with this project and JAX for CUDA 12 installed at the pinned versions, so workers run the same code and
# libraries as the launcher. Build and push, then pass --sdk_container_image=IMAGE --sdk_location=container:
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/alignet:TAG . && docker push REGION-docker.pkg.dev/PROJECT/REPO/alignet:TAG
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/alignet
# Dependencies first (a layer that survives code edits), then the code.
COPY constraints.txt setup.py pyproject.toml README.md ./
RUN mkdir -p alignet_data pipelines trainer schemas \
    && touch alignet_data/__init__.py pipelines/__init__.py trainer/__init__.py \
    && pip install --no-cache-dir -c constraints.txt . \
    && JAX_VERSION=$(python -c "import jax; print(jax.__version__)") \
    && pip install --no-cache-dir -c constraints.txt "jax[cuda12]==${JAX_VERSION}" \
    && pip uninstall -y alignet-data
COPY alignet_data alignet_data
COPY pipelines pipelines
COPY trainer trainer
COPY schemas schemas
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
    && python -c "import alignet_data.artifacts, pipelines.cli, trainer.train; print('alignet image ok')"

# The SDK harness is the entry point (inherited from the base image); nothing to override.
