"""The model pieces: checkpoint, prompt encoding, the denoising loop, VAE decoding, video, and the graph specs.

Imports only `config`."""
