"""The ``twistd dify-sri`` service plugin: our SRI connector."""

from twisted.application.service import ServiceMaker

dify_sri = ServiceMaker(
    "dify-sri",
    "difydaemon.sri.tap",
    "An SRI connector: builds and runs Dify plugin packages as serverless functions.",
    "dify-sri",
)
