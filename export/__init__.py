"""crnet.export: ONNX graphs, FP16 conversion, TensorRT engines and bundles.

Empty until the export issue lands; it installs as `crnet.export` so that nothing generic ends up at the
top level of anyone's site-packages.
"""
