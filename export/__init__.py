"""crnet.export: checkpoint -> bundle of ONNX graphs (FP32, FP16), TensorRT engines, Triton repository.

    graphs.py    the encoder / prompt / head cut and the torch.export-based ONNX export
    build.py     `crnet export`: export, check against PyTorch with ONNX Runtime, commit the bundle
    writer.py    the manifest, checksums and atomic writes (crnet.bundle reads bundles)
    tensorrt.py  engines for TensorRT 10 (FP16 flag) and 11 (strongly typed FP16 graphs)
    triton.py    a Triton Inference Server model repository from a bundle

It installs as `crnet.export`, so nothing generic lands at the top level of site-packages.
"""

if __name__ != "crnet.export":  # one module identity: `export` and `crnet.export` would be two
    raise ImportError(f"this package installs as crnet.export: import that, not {__name__}")
