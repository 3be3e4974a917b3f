# nginx from Debian's packages on the local Debian base (nginx:stable where a registry is
# reachable works the same with docker/nginx.conf), running as an unprivileged user.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/*
COPY nginx.conf /etc/nginx/taxon.conf
USER www-data
EXPOSE 50052 8080
ENTRYPOINT ["nginx", "-c", "/etc/nginx/taxon.conf", "-g", "daemon off;"]
