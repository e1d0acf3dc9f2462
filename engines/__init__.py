"""crnet.engines: one runtime per backend (torch, ONNX Runtime, TensorRT) behind one interface.

Empty until the runtimes issue lands; it installs as `crnet.engines`.
"""
