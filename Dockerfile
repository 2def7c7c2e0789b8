# The production image of eldersafe: server, edge (with the simulators) and the
# broker-files step of docker-compose.yml share it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY device_drivers device_drivers
COPY alerting alerting
COPY simulators simulators
RUN pip install --no-cache-dir . \
    && mkdir -p /var/lib/eldersafe && chown nobody:nogroup /var/lib/eldersafe
# gives each server replica a broker account of its own (docker-compose --scale server=N)
COPY deploy/server_account.py deploy/server_account.py
USER nobody
ENTRYPOINT ["eldersafe"]
CMD ["server"]
