# The production image of eldersafe (server and edge share it).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY device_drivers device_drivers
COPY alerting alerting
COPY simulators simulators
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["eldersafe"]
CMD ["server"]
