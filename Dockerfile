# flm_dist on the Ray 2.60 GPU image: CUDA build of the pinned torch, the package and its
# pinned dependencies; runs as the image's non-root `ray` user. Usable as a RayJob /
# RayCluster image: the entrypoint is the `flm-dist` CLI or `ray start` as KubeRay needs.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/flm_dist
COPY --chown=ray:users pyproject.toml constraints.txt README.md LICENSE ./
COPY --chown=ray:users flm_dist ./flm_dist
COPY --chown=ray:users jobs ./jobs

# torch comes from PyTorch's CUDA index (same version as pyproject.toml pins); everything
# else is pinned by constraints.txt.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && pip install --no-cache-dir -c constraints.txt .

USER ray
ENV FLM_LOG=WARNING
CMD ["flm-dist", "--help"]
