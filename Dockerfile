# flm_dist on Ray's GPU image: the CUDA build of the pinned torch, the package with its
# pinned dependency tree (constraints.txt), the job files, running as the image's
# non-root `ray` user.
#
#   docker build -t flm-dist:0.1.0 .
#
# No ENTRYPOINT on purpose: KubeRay (RayCluster / RayJob) and the cluster launcher run
# `ray start ...` as the container's command and submit `flm-dist pretrain|finetune ...`
# through the Ray Jobs API; an ENTRYPOINT would wrap their command and break that.
# `docker run flm-dist:0.1.0` alone prints the CLI's help.
#
# The tag must match pyproject.toml: Ray 2.60.0, Python 3.11 (tests/test_cluster_configs.py
# checks it). `-gpu` is Ray's alias for its default CUDA image; torch wheels bundle their
# own CUDA runtime, so they only need a new enough NVIDIA driver on the host.
FROM rayproject/ray:2.60.0-py311-gpu

# The base image's user: `ray`, uid 1000, group `users` (gid 100); its Python lives in
# /home/ray/anaconda3 and belongs to that user, so pip needs no root.
USER 1000:100
WORKDIR /home/ray/flm_dist

# torch first, in its own layer: it is by far the largest download and changes only with
# its pin (the same version as pyproject.toml). cu128 wheels run on Ampere and Hopper.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" \
    && python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'"

# The package and every dependency at the pinned versions; the CUDA torch above already
# satisfies its pin (2.13.0+cu128 == 2.13.0), so pip keeps it.
COPY --chown=1000:100 pyproject.toml constraints.txt README.md LICENSE ./
COPY --chown=1000:100 flm_dist ./flm_dist
COPY --chown=1000:100 jobs ./jobs
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import ray, torch, flm_dist; assert ray.__version__ == '2.60.0', ray.__version__; assert torch.version.cuda" \
    && flm-dist --help > /dev/null

# RAY_idle_worker_killing_time_threshold_ms: `ray start` on this image keeps idle worker
# processes a minute instead of 1 s, so each epoch's read tasks reuse them rather than
# wait for a new Python process (flm_dist/launch.py, RAY_NODE_ENV: the same settings).
ENV FLM_LOG=WARNING \
    PYTHONUNBUFFERED=1 \
    RAY_idle_worker_killing_time_threshold_ms=60000
CMD ["flm-dist", "--help"]
