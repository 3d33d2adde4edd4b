# syntax=docker/dockerfile:1
# shardtrain's GPU image: docker build -t shardtrain .   (see docs/container.md)
# Every Python install step is docker/install.sh, which tests/test_container.py also runs.
ARG BASE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

# Wheels of the pinned dependencies, installed here too so that shardtrain's own wheel builds
# without an index. Every pin has a binary wheel, so no compiler is needed even here.
# Rebuilt only when docker/requirements.lock changes.
FROM ${BASE} AS builder
WORKDIR /src
COPY docker/install.sh docker/requirements.lock docker/
RUN docker/install.sh venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN docker/install.sh wheels /wheels && docker/install.sh deps /wheels

# shardtrain's wheel: the one stage the source invalidates.
FROM builder AS app
COPY pyproject.toml README.md ./
COPY shards shards
COPY pipelines pipelines
COPY training training
COPY flows flows
RUN docker/install.sh app-wheel /dist

FROM ${BASE}
COPY docker/install.sh docker/requirements.lock /opt/shardtrain/docker/
RUN /opt/shardtrain/docker/install.sh venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
# Wheels are bind-mounted from the builders, so they never land in a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    /opt/shardtrain/docker/install.sh deps /wheels
RUN --mount=type=bind,from=app,source=/dist,target=/dist \
    /opt/shardtrain/docker/install.sh app /dist
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash shardtrain \
    && mkdir -p /workspace/data /workspace/runs /home/shardtrain/.prefect /cache/huggingface \
    && chown -R shardtrain:shardtrain /workspace /home/shardtrain /cache
# model.pretrained: true fetches timm's weights into the Hugging Face cache once; a volume keeps them
# across containers (and lets an offline host, HF_HUB_OFFLINE=1, be given a filled one).
ENV HF_HOME=/cache/huggingface
WORKDIR /workspace
# What Prefect deployments run from: `prefect deploy` here makes /workspace each flow run's
# working directory, so entrypoints, configs/ and runs/ resolve as in a checkout.
COPY --chown=shardtrain:shardtrain prefect.yaml ./
COPY --chown=shardtrain:shardtrain configs configs
COPY --chown=shardtrain:shardtrain flows flows
# uid 1000 is the shardtrain user made above.
USER 1000:1000
VOLUME ["/workspace/data", "/workspace/runs", "/cache/huggingface"]
ENTRYPOINT ["shardtrain"]
CMD ["--help"]
