// crnet::refine_loop: the schema, shared by every backend, and the Python module that loads them.
//
// refine_loop(features, previous, weights, dilations, iterations, exit_fraction) runs CRNet's mask
// refinement (y_0 = previous or zeros; for t = 1..T: h = X + R1([X, y]); h += R2(h); h += R3(h);
// logits = classifier(ASPP(h)); y = softmax(logits)) and returns the last logits (N, 2, H, W) and, per
// sample, the iterations it used (N,) int64. With exit_fraction > 0 a sample stops after iteration t >= 2
// once fewer than exit_fraction * H * W of its mask pixels changed since iteration t - 1. With
// cudnn_epilogues the channels-last CUDA path runs the convolutions that end in a ReLU as cuDNN's fused
// convolution-bias-ReLU kernels instead of a convolution and an epilogue kernel of ours (the other paths
// have no such choice and ignore it).
//
// weights, in order (the module names of crnet.model.refinement.Refinement):
//   feedback.1 (C, C+2, 3, 3), bias; feedback.3 (C, C, 3, 3), bias;
//   residual2.1, residual2.3, residual3.1, residual3.3 (C, C, 3, 3), each with its bias;
//   aspp.image_pool (C, C, 1, 1), bias; aspp.branches.0 (C, C, 1, 1), bias;
//   aspp.branches.1..D (C, C, 3, 3), bias, one per entry of `dilations`;
//   aspp.project (C, (2+D) C, 1, 1), bias; classifier (2, C, 1, 1), bias.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(crnet, m) {
  m.def(
      "refine_loop(Tensor features, Tensor? previous, Tensor[] weights, int[] dilations, int iterations, "
      "float exit_fraction=0.0, bool cudnn_epilogues=False) -> (Tensor logits, Tensor iterations_used)");
}

// `import crnet._C` loads this library, whose static initialisers register the op and its backends.
static PyModuleDef crnet_module = {PyModuleDef_HEAD_INIT, "_C", "crnet native ops (crnet::refine_loop)", -1,
                                   nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&crnet_module);
  // crnet.ops refuses a library built against another torch: its C++ ABI would not match.
  if (module != nullptr && PyModule_AddStringConstant(module, "torch_version", CRNET_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
