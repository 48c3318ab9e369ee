"""File formats: all-or-nothing folders (atomic), the safetensors checkpoint with its plan, exports (TorchScript,
torch.export, ONNX, timm's config.json), and pretrained weights from the libraries' own caches."""
