"""Wan2.2 text-to-video serving library behind the Triton Python-backend models."""
