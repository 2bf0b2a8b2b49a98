"""Stand-ins for what only a running Triton server provides."""
