"""What the runner tells Prefect about a run while it happens: heartbeats (later: metrics)."""
