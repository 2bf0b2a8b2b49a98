"""The engines that run one component's graph (PyTorch, ONNX Runtime, CUDA-graph replay, the reserved TensorRT slot);
the deployment config chooses one per component. Their interface is `wan_triton.model.engine.Engine`."""
