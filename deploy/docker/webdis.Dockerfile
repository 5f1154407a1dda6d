# Webdis (Redis over HTTP) from Debian's package: the version the end-to-end tests run.
# Context: the repository root.
#
#   docker build -f deploy/docker/webdis.Dockerfile -t REGISTRY/tollgate/webdis:0.1.9 .
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends webdis=0.1.9+dfsg-1.1 \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/webdis-entrypoint.sh /usr/local/bin/webdis-entrypoint
USER 65532:65532
EXPOSE 7379
# A TCP connect: the ACL admits only authenticated EVAL, so there is no open URL to probe.
HEALTHCHECK --interval=10s --timeout=3s CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7379"]
ENTRYPOINT ["/usr/local/bin/webdis-entrypoint"]
