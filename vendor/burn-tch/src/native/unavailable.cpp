// mvlt patch: stand-ins for aten_backward.cpp when no libtorch headers were found at build time
// (burn-tch's build script then compiles no libtorch code); every call reports it, and the Rust
// side falls back to its own path.
#include <cstdint>

extern "C" {
const char *burn_tch_native_last_error() { return "burn-tch was built without libtorch headers"; }

int burn_tch_conv2d_backward(const void *, const void *, const void *, const int64_t *, const int64_t *,
                             const int64_t *, int64_t, int, int, void **grad_input, void **grad_weight) {
  *grad_input = nullptr;
  *grad_weight = nullptr;
  return 1;
}

int burn_tch_layer_norm_backward(const void *, const void *, const void *, double, void **grad_input,
                                 void **grad_weight, void **grad_bias) {
  *grad_input = nullptr;
  *grad_weight = nullptr;
  *grad_bias = nullptr;
  return 1;
}
}
