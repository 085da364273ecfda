"""kleave benchmarks: each compares side by side in one run and prints a Markdown table."""
