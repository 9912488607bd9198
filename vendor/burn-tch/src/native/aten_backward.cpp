// mvlt patch (vendor/README.md): ATen backward kernels that tch 0.22 does not bind, for burn-tch's
// conv2d backward and mvlt's layer-norm backward. Each function returns 0 and hands out new
// `at::Tensor`s (owned by the caller, freed by tch's `at_free`), or returns 1 and leaves a message
// for `burn_tch_native_last_error`; the Rust side then falls back to its own path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/zeros_like.h>
#include <cstring>
#include <exception>

namespace {
thread_local char last_error[1024];

void set_error(const char *message) {
  std::strncpy(last_error, message, sizeof(last_error) - 1);
  last_error[sizeof(last_error) - 1] = '\0';
}

at::Tensor *give(at::Tensor t) { return t.defined() ? new at::Tensor(std::move(t)) : nullptr; }
} // namespace

extern "C" {
const char *burn_tch_native_last_error() { return last_error; }

// Gradients of `conv2d(input, weight)` (no transposition) for `grad_output`: `want_input` /
// `want_weight` choose which are computed; the other pointer is set to null.
int burn_tch_conv2d_backward(const at::Tensor *grad_output, const at::Tensor *input, const at::Tensor *weight,
                             const int64_t *stride, const int64_t *padding, const int64_t *dilation,
                             int64_t groups, int want_input, int want_weight, at::Tensor **grad_input,
                             at::Tensor **grad_weight) {
  try {
    *grad_input = nullptr;
    *grad_weight = nullptr;
    const int64_t zero[2] = {0, 0};
    auto r = at::convolution_backward(*grad_output, *input, *weight, c10::nullopt, at::IntArrayRef(stride, 2),
                                      at::IntArrayRef(padding, 2), at::IntArrayRef(dilation, 2), false,
                                      at::IntArrayRef(zero, 2), groups,
                                      {want_input != 0, want_weight != 0, false});
    *grad_input = give(std::get<0>(r));
    *grad_weight = give(std::get<1>(r));
    return 0;
  } catch (const std::exception &e) {
    set_error(e.what());
    return 1;
  }
}

// Gradients of `layer_norm(input, [D], weight, bias, eps)` over the last axis for `grad_output`:
// input, weight and bias. The statistics are recomputed from `input`.
int burn_tch_layer_norm_backward(const at::Tensor *grad_output, const at::Tensor *input, const at::Tensor *weight,
                                 double eps, at::Tensor **grad_input, at::Tensor **grad_weight,
                                 at::Tensor **grad_bias) {
  try {
    *grad_input = nullptr;
    *grad_weight = nullptr;
    *grad_bias = nullptr;
    const int64_t d = input->size(-1);
    // The statistics from the forward kernel (its output is dropped): `var_mean` over a short
    // last axis took several times as long as the whole layer-norm forward.
    auto stats = at::native_layer_norm(*input, at::IntArrayRef{d}, *weight, c10::nullopt, eps);
    const auto &mean = std::get<1>(stats);
    const auto &rstd = std::get<2>(stats);
    // The kernel sizes the bias gradient after `bias`; only its shape and type are read.
    auto bias = at::zeros_like(*weight);
    auto r = at::native_layer_norm_backward(*grad_output, *input, at::IntArrayRef{d}, mean, rstd, *weight, bias,
                                            {true, true, true});
    *grad_input = give(std::get<0>(r));
    *grad_weight = give(std::get<1>(r));
    *grad_bias = give(std::get<2>(r));
    return 0;
  } catch (const std::exception &e) {
    set_error(e.what());
    return 1;
  }
}
}
