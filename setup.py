"""Installs difydaemon, its twistd plugin and the ``dify`` console script."""

from setuptools import find_packages, setup

setup(
    name="difydaemon",
    version="0.1.0",
    description="A Dify plugin daemon on Twisted",
    python_requires=">=3.11",
    packages=find_packages(include=["difydaemon", "difydaemon.*"]) + ["twisted.plugins"],
    package_data={
        "difydaemon": [
            "persistence/migrations/*.sql",
            "packaging/keys/*.pem",
        ],
    },
    install_requires=[
        "Twisted>=24.3",
        "klein>=24.8",
        "treq>=24.9",
        "txpostgres>=1.7",
        "psycopg2-binary>=2.9",
        "attrs>=23.1",
        "orjson>=3.9",
        "PyYAML>=6.0",
        "cryptography>=42",
        "zope.interface>=6",
        "uv>=0.5",
        # Redis coordination for replicas (difydaemon.coordination.redis):
        # its protocol only; connecting is ours (ecosystem.md §1)
        "txredisapi>=1.6,<2",
        # /metrics: exposition of our own collectors (ecosystem.md §2)
        "prometheus-client>=0.20",
        # PLUGIN_STORAGE_TYPE=aws_s3 (difydaemon.storage.s3): botocore signs
        # and addresses; its calls run in a thread pool
        "boto3>=1.36",
    ],
    extras_require={
        # an S3-compatible server the storage tests start on loopback
        "test": ["moto[server]>=5"],
        # ENABLE_OTEL=true: spans and metrics exported over OTLP/HTTP
        "otel": [
            "opentelemetry-sdk>=1.25",
            "opentelemetry-exporter-otlp-proto-http>=1.25",
        ],
        # ENABLE_OTEL=true with OTEL_EXPORTER_OTLP_PROTOCOL=grpc (grpcio is
        # a large binary wheel: only for those who choose gRPC)
        "otel-grpc": [
            "opentelemetry-sdk>=1.25",
            "opentelemetry-exporter-otlp-proto-grpc>=1.25",
        ],
    },
    entry_points={
        "console_scripts": ["dify = difydaemon.cli.main:main"],
    },
)
