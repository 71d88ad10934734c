"""The `vm` Prefect worker: one VM per flow run, started from the runner's image on AWS, GCP,
Azure or locally (podman), and everything it started deleted at the end.

Prefect finds the worker type through this distribution's ``prefect.collections`` entry
point, which imports ``runner.launch.worker``; importing this package alone imports
nothing heavy.
"""
