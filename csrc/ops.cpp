// Op schemas of the chargpt extension. Kernels live in cpu/*.cpp (CPU) and cuda/*.cu (CUDA); the Python side
// (kernels/ext_*.py) adds fake (meta) implementations and autograd.
#include <torch/library.h>

#ifdef CHARGPT_BUILD_STAMP
// setup.py builds: kernels/ext_build.py reads this string from the file (before loading it) to check that the
// library was built for the running torch, and whether it holds the CUDA kernels.
extern "C" __attribute__((used, visibility("default"))) const char chargpt_build_stamp[] = CHARGPT_BUILD_STAMP;
#endif

TORCH_LIBRARY(chargpt, m) {
  // y, mean, rstd over the last dim of a 2-D x (M, N); weight and bias are (N,) or None.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // dx, dweight, dbias (dweight/dbias are always returned; the caller drops what it does not need).
  m.def("layer_norm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)");
  // out (B, H, Tq, D) and log-sum-exp (B, H, Tq) in fp32; seed is a 1-element int64 tensor when dropout_p > 0.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool is_causal, float dropout_p, float scale, Tensor? seed)"
        " -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool is_causal,"
        " float dropout_p, float scale, Tensor? seed) -> (Tensor, Tensor, Tensor)");
}
