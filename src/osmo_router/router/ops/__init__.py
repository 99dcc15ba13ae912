"""What operators see: Prometheus metrics and the health/metrics HTTP port."""
