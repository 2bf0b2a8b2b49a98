"""Launching the real Triton server: in the foreground (`server`) or in the background
for tests and demos (`launch`)."""
