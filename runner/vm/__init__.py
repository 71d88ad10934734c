"""What the runner does to and learns from the machine it runs on."""
