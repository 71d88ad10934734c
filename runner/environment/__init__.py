"""The flow's software environment: specs, materialization with uv, container images."""
