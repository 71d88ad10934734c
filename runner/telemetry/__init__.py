"""What the runner tells Prefect about a run while it happens: heartbeats, phases and
hardware metrics as events, the run summary artifact, and the automation that crashes a
run whose VM went silent."""
