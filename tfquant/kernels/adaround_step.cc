// Two CPU kernels for AdaRound's solver loop (tfquant/adaround_solver.py): one Adam iteration of AdaRound's loss
// is, in plain ops, about forty elementwise ops on the [B, K, C] weight matrices around one matmul, and on ResNet-20
// those ops, not the matmul, take most of the solver's CPU time (a pass over the tensor and an op dispatch each).
//
// TfquantAdaroundDifference: from sig = sigmoid(V), the weight difference D = start + step * h and the
//   regulariser's distance max(|2h - 1|, 1e-12), h = clip(sig * (zeta - gamma) + gamma, 0, 1).
// TfquantAdaroundAdam: from the same sig, G D (the matmul) and exp((beta - 1) log distance) (TensorFlow's own
//   Log, Mul and Exp: their vectorised approximations are not re-implemented here), the gradient and the Adam step.
//
// Every float32 operation is the one the op chain of adaround_solver runs, in the same order, with the same
// constants (passed as attributes, converted to float32 by TensorFlow as the op chain's constants are), so the
// results are bit for bit the same; the build compiles with -ffp-contract=off so that no multiply-add is fused
// into an FMA (one rounding instead of two). Only exactly rounded operations (+, -, *, /, sqrt, min, max,
// comparisons) are computed here.
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfquant {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShapeUtils;
namespace shape_inference = ::tensorflow::shape_inference;

// The rectified sigmoid's h and whether its stretched value is inside (0, 1), as the op chain computes them:
// stretched = sig * scale + shift (two roundings); h = maximum(minimum(stretched, 1), 0) (tf.clip_by_value).
struct Rectified {
  float stretched;
  float h;
};

inline Rectified Rectify(float sig, float scale, float shift) {
  const float product = sig * scale;
  const float stretched = product + shift;
  const float upper = stretched < 1.0f ? stretched : 1.0f;
  return {stretched, upper > 0.0f ? upper : 0.0f};
}

void RunSharded(OpKernelContext* context, int64_t count, int64_t cost, std::function<void(int64_t, int64_t)> work) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers.num_threads, workers.workers, count, cost, work);
}

bool SameShapes(OpKernelContext* context, std::initializer_list<int> inputs) {
  const Tensor& first = context->input(*inputs.begin());
  for (int index : inputs) {
    if (context->input(index).shape() != first.shape()) {
      context->SetStatus(::tensorflow::errors::InvalidArgument(
          "input ", index, " has shape ", context->input(index).shape().DebugString(), "; expected ",
          first.shape().DebugString()));
      return false;
    }
  }
  return true;
}

class DifferenceOp : public OpKernel {
 public:
  explicit DifferenceOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(context, context->GetAttr("shift", &shift_));
    OP_REQUIRES_OK(context, context->GetAttr("floor", &floor_));
  }

  void Compute(OpKernelContext* context) override {
    if (!SameShapes(context, {0, 1, 2})) return;
    const Tensor& sig = context->input(0);
    Tensor *difference = nullptr, *distance = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, sig.shape(), &difference));
    OP_REQUIRES_OK(context, context->allocate_output(1, sig.shape(), &distance));
    const float* s = sig.flat<float>().data();
    const float* start = context->input(1).flat<float>().data();
    const float* step = context->input(2).flat<float>().data();
    float* d = difference->flat<float>().data();
    float* r = distance->flat<float>().data();
    const float scale = scale_, shift = shift_, floor = floor_;
    RunSharded(context, sig.NumElements(), 10, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float h = Rectify(s[i], scale, shift).h;
        const float moved = step[i] * h;
        d[i] = start[i] + moved;
        const float doubled = 2.0f * h;
        const float magnitude = std::fabs(doubled - 1.0f);
        r[i] = magnitude > floor ? magnitude : floor;  // tf.maximum(|2h - 1|, floor)
      }
    });
  }

 private:
  float scale_, shift_, floor_;
};

class AdamOp : public OpKernel {
 public:
  explicit AdamOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("regularised", &regularised_));
    for (const char* name : {"scale", "shift", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "epsilon"}) {
      float value;
      OP_REQUIRES_OK(context, context->GetAttr(name, &value));
      constants_.push_back(value);
    }
  }

  // Inputs: v, m, s, sig, product (G D), step, movable, powered (|2h - 1|^(beta - 1), only read when
  // regularised), weight, slope, rate (scalars). Outputs: v, m, s after the step.
  void Compute(OpKernelContext* context) override {
    if (!SameShapes(context, regularised_ ? std::initializer_list<int>{0, 1, 2, 3, 4, 5, 6, 7}
                                          : std::initializer_list<int>{0, 1, 2, 3, 4, 5})) {
      return;
    }
    for (int index : {8, 9, 10}) {
      OP_REQUIRES(context, TensorShapeUtils::IsScalar(context->input(index).shape()),
                  ::tensorflow::errors::InvalidArgument("input ", index, " must be a scalar"));
    }
    const Tensor& v_in = context->input(0);
    Tensor *v_out = nullptr, *m_out = nullptr, *s_out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, v_in.shape(), &v_out));
    OP_REQUIRES_OK(context, context->allocate_output(1, v_in.shape(), &m_out));
    OP_REQUIRES_OK(context, context->allocate_output(2, v_in.shape(), &s_out));
    const float* v = v_in.flat<float>().data();
    const float* m = context->input(1).flat<float>().data();
    const float* s = context->input(2).flat<float>().data();
    const float* sig = context->input(3).flat<float>().data();
    const float* product = context->input(4).flat<float>().data();
    const float* step = context->input(5).flat<float>().data();
    const float* movable = regularised_ ? context->input(6).flat<float>().data() : nullptr;
    const float* powered = regularised_ ? context->input(7).flat<float>().data() : nullptr;
    const float weight = context->input(8).scalar<float>()(), slope = context->input(9).scalar<float>()();
    const float rate = context->input(10).scalar<float>()();
    float* vo = v_out->flat<float>().data();
    float* mo = m_out->flat<float>().data();
    float* so = s_out->flat<float>().data();
    const bool regularised = regularised_;
    const float scale = constants_[0], shift = constants_[1], beta1 = constants_[2], one_minus_beta1 = constants_[3],
                beta2 = constants_[4], one_minus_beta2 = constants_[5], epsilon = constants_[6];
    RunSharded(context, v_in.NumElements(), 40, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Rectified rectified = Rectify(sig[i], scale, shift);
        // grad = 2.0 * matmul * step
        const float doubled = 2.0f * product[i];
        float grad = doubled * step[i];
        if (regularised) {
          // grad + weight * movable * (slope * powered * sign(2h - 1))
          const float signed_distance = 2.0f * rectified.h - 1.0f;
          const float sign = signed_distance > 0.0f ? 1.0f : (signed_distance < 0.0f ? -1.0f : 0.0f);
          const float weighted = weight * movable[i];
          const float sloped = slope * powered[i];
          const float signed_term = sloped * sign;
          const float term = weighted * signed_term;
          grad = grad + term;
        }
        // grad * sig * ((1 - sig) * (zeta - gamma)) * inside
        const float inside = (rectified.stretched > 0.0f) & (rectified.stretched < 1.0f) ? 1.0f : 0.0f;
        const float complement = 1.0f - sig[i];
        const float slope_of_h = complement * scale;
        grad = grad * sig[i];
        grad = grad * slope_of_h;
        grad = grad * inside;
        const float kept_m = beta1 * m[i], new_m = one_minus_beta1 * grad;
        const float m_next = kept_m + new_m;
        const float squared = grad * grad;
        const float kept_s = beta2 * s[i], new_s = one_minus_beta2 * squared;
        const float s_next = kept_s + new_s;
        const float numerator = rate * m_next;
        const float denominator = std::sqrt(s_next) + epsilon;
        const float update = numerator / denominator;
        vo[i] = v[i] - update;
        mo[i] = m_next;
        so[i] = s_next;
      }
    });
  }

 private:
  bool regularised_;
  std::vector<float> constants_;
};

::absl::Status SameAsFirstTwice(shape_inference::InferenceContext* context) {
  context->set_output(0, context->input(0));
  context->set_output(1, context->input(0));
  return ::absl::OkStatus();
}

::absl::Status SameAsFirstThrice(shape_inference::InferenceContext* context) {
  for (int index = 0; index < 3; ++index) context->set_output(index, context->input(0));
  return ::absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfquantAdaroundDifference")
    .Input("sig: float")
    .Input("start: float")
    .Input("step: float")
    .Output("difference: float")
    .Output("distance: float")
    .Attr("scale: float")
    .Attr("shift: float")
    .Attr("floor: float")
    .SetShapeFn(SameAsFirstTwice);

REGISTER_OP("TfquantAdaroundAdam")
    .Input("v: float")
    .Input("m: float")
    .Input("s: float")
    .Input("sig: float")
    .Input("product: float")
    .Input("step: float")
    .Input("movable: float")
    .Input("powered: float")
    .Input("weight: float")
    .Input("slope: float")
    .Input("rate: float")
    .Output("v_next: float")
    .Output("m_next: float")
    .Output("s_next: float")
    .Attr("regularised: bool")
    .Attr("scale: float")
    .Attr("shift: float")
    .Attr("beta1: float")
    .Attr("one_minus_beta1: float")
    .Attr("beta2: float")
    .Attr("one_minus_beta2: float")
    .Attr("epsilon: float")
    .SetShapeFn(SameAsFirstThrice);

REGISTER_KERNEL_BUILDER(Name("TfquantAdaroundDifference").Device(::tensorflow::DEVICE_CPU), DifferenceOp);
REGISTER_KERNEL_BUILDER(Name("TfquantAdaroundAdam").Device(::tensorflow::DEVICE_CPU), AdamOp);

}  // namespace tfquant
