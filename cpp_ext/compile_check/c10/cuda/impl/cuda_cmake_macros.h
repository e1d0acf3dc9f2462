// Stand-in for the header a CUDA build of torch generates and a CPU-only wheel lacks. Used only to
// compile-check the CUDA backend against a CPU-only torch; a CUDA torch brings its own.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
