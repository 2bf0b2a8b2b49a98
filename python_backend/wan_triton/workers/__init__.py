"""Worker processes of a parallel plan or a split VAE decode: the process world, the worker, its rank's model, the
supervisor that owns the group, and how ranks agree to stop a request."""
