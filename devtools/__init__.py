"""Local stand-ins for the demo, the tests and the benchmarks (not shipped in the wheel)."""
