"""
Seeing what the daemon does: Prometheus metrics (:mod:`.metrics`), log
observers (:mod:`.logs`), W3C trace context (:mod:`.trace`) and the optional
OpenTelemetry export (:mod:`.otel`).
"""
