# lmrunner (the factory) as an image, for sites that deploy it this way. It drives the host's
# engines, so run it with the host's Docker socket, cgroup tree and state directory mounted in:
#
#   make image            # builds the wheels on the host, then this image
#   docker run -d --name lmrunner --pid=host --cgroupns=host \
#     -v /var/run/docker.sock:/var/run/docker.sock -v /sys/fs/cgroup:/sys/fs/cgroup \
#     -v /etc/lmrunner:/etc/lmrunner:ro -v /var/lib/lmrunner:/var/lib/lmrunner lmrunner:latest daemon
#
# The wheels come from the build context (build/wheels, made by `pip wheel`), so the build needs
# no package index: pip inside a container has no CA bundle and often no network at sites.
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY build/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/lmrunner \
 && /opt/lmrunner/bin/pip install --no-index --find-links /tmp/wheels vacuum-lmrunner \
 && rm -rf /tmp/wheels

ENV PATH=/opt/lmrunner/bin:$PATH
ENTRYPOINT ["lmrunner"]
CMD ["--help"]
