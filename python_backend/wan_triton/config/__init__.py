"""What a deployment and a request may say: the deployment file, request validation, the parallel plan."""
