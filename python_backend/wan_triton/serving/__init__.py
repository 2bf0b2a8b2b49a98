"""The Triton side: tensor names of every model, and the Python-backend model classes behind the model.py files."""

from wan_triton.serving.compat import hide_unusable_packages

hide_unusable_packages()
