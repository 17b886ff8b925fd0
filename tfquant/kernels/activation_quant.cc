// Two CPU kernels for the activation quantizers of tfquant's training graphs (tfquant/kernels/__init__.py).
//
// A training graph quantizes each activation with a batch range: Min and Max reductions (two passes over the
// tensor) and an elementwise chain Sub, Mul, Round, Mul, AddV2 (a read and a write pass each). These kernels
// do the same arithmetic in two passes in all: TfquantMinMax (both reductions in one read) and
// TfquantQuantizeInRange (the whole chain in one read and one write). Every float32 operation is the one the
// op chain runs, in the same order, so the outputs are bit for bit the same; the build compiles with
// -ffp-contract=off so that no multiply-add is fused into an FMA (one rounding instead of two).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
namespace shape_inference = ::tensorflow::shape_inference;

// Elements per block of TfquantMinMax: each block has its own partial result, so the result does not depend
// on how the thread pool splits the blocks.
constexpr int64_t kBlock = 1 << 14;

// A float's bits mapped to an int32 whose order is the floats' order with -0.0 below +0.0, and NaNs beyond
// the infinities (negative NaNs below -inf, positive above +inf).
inline int32_t OrderedKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

inline float FromOrderedKey(int32_t key) {
  int32_t bits = key ^ ((key >> 31) & 0x7fffffff);
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

struct KeyRange {
  int32_t low;
  int32_t high;
};

// Vector code for AVX2 where the CPU has it, else baseline SSE2, chosen when the library loads (GCC function
// multi-versioning): a library built with -march=native would crash on an older CPU sharing the checkout.
#define TFQUANT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))

TFQUANT_VECTOR_CLONES KeyRange BlockRange(const float* x, int64_t size) {
  // GCC's vector extensions: 8 int32 lanes (one AVX2 register, two SSE2 ones), two of them per step so the
  // min and max chains of consecutive loads do not wait on each other. Left to itself, GCC vectorizes a
  // lane loop across iterations with shuffles, at a third of this speed.
  typedef int32_t Lanes __attribute__((vector_size(32)));
  constexpr int kWidth = sizeof(Lanes) / sizeof(int32_t);
  Lanes low[2], high[2];
  for (int half = 0; half < 2; ++half) {
    for (int lane = 0; lane < kWidth; ++lane) {
      low[half][lane] = std::numeric_limits<int32_t>::max();
      high[half][lane] = std::numeric_limits<int32_t>::min();
    }
  }
  int64_t i = 0;
  for (; i + 2 * kWidth <= size; i += 2 * kWidth) {
    for (int half = 0; half < 2; ++half) {
      Lanes bits;
      std::memcpy(&bits, x + i + half * kWidth, sizeof bits);
      const Lanes key = bits ^ ((bits >> 31) & 0x7fffffff);
      low[half] = key < low[half] ? key : low[half];
      high[half] = key > high[half] ? key : high[half];
    }
  }
  KeyRange range = {std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()};
  for (int half = 0; half < 2; ++half) {
    for (int lane = 0; lane < kWidth; ++lane) {
      range.low = low[half][lane] < range.low ? low[half][lane] : range.low;
      range.high = high[half][lane] > range.high ? high[half][lane] : range.high;
    }
  }
  for (; i < size; ++i) {
    const int32_t key = OrderedKey(x[i]);
    range.low = key < range.low ? key : range.low;
    range.high = key > range.high ? key : range.high;
  }
  return range;
}

// min(x) and max(x) as tf.reduce_min / tf.reduce_max give them: +inf and -inf for an empty tensor, NaN for
// both when x holds a NaN. A tensor holding both zeros gets -0.0 as its minimum and +0.0 as its maximum (the
// reductions' sign there depends on the order of the elements; the two compare equal, and the quantizer's
// outputs are the same with either).
class MinMaxOp : public OpKernel {
 public:
  explicit MinMaxOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    const float* x = input.flat<float>().data();
    const int64_t size = input.NumElements();
    const int64_t blocks = (size + kBlock - 1) / kBlock;
    std::vector<KeyRange> partial(blocks);
    auto work = [x, size, &partial](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        const int64_t start = block * kBlock;
        partial[block] = BlockRange(x + start, std::min(kBlock, size - start));
      }
    };
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    // About one cycle per element for a compare-and-select pair on vectors.
    ::tensorflow::Shard(workers.num_threads, workers.workers, blocks, kBlock, work);
    float low = std::numeric_limits<float>::infinity();
    float high = -std::numeric_limits<float>::infinity();
    if (blocks > 0) {
      KeyRange range = partial[0];
      for (int64_t block = 1; block < blocks; ++block) {
        range.low = partial[block].low < range.low ? partial[block].low : range.low;
        range.high = partial[block].high > range.high ? partial[block].high : range.high;
      }
      low = FromOrderedKey(range.low);
      high = FromOrderedKey(range.high);
      // A NaN sorts below -inf (negative) or above +inf (positive): one of the two ends shows it.
      if (std::isnan(low) || std::isnan(high)) {
        low = high = std::numeric_limits<float>::quiet_NaN();
      }
    }
    Tensor* minimum = nullptr;
    Tensor* maximum = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &minimum));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({}), &maximum));
    minimum->scalar<float>()() = low;
    maximum->scalar<float>()() = high;
  }
};

// round half to even (tf.round) without a library call, so the loop vectorizes with baseline SSE2: for
// 0 <= a < 2^23, a + 2^23 lies where float32's spacing is 1 and rounds to the nearest integer, ties to the
// even one; subtracting 2^23 again is exact. Larger magnitudes, infinities and NaNs are returned as they are.
inline float RoundHalfToEven(float value) {
  const float two_23 = 8388608.0f;
  const float magnitude = std::fabs(value);
  const float rounded = std::copysign((magnitude + two_23) - two_23, value);
  // A select of bits rather than of floats: GCC keeps a float select as a branch (the float operations on
  // its side might trap), which stops the loop from vectorizing.
  uint32_t rounded_bits, value_bits;
  std::memcpy(&rounded_bits, &rounded, sizeof rounded_bits);
  std::memcpy(&value_bits, &value, sizeof value_bits);
  const uint32_t take_rounded = 0u - static_cast<uint32_t>(magnitude < two_23);
  const uint32_t bits = (rounded_bits & take_rounded) | (value_bits & ~take_rounded);
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

TFQUANT_VECTOR_CLONES void QuantizeSpan(const float* x, float* y, int64_t size, float low, float scale,
                                        float step) {
  for (int64_t i = 0; i < size; ++i) {
    const float codes = RoundHalfToEven((x[i] - low) * scale);
    y[i] = codes * step + low;
  }
}

// y = round((x - lo) * (levels / alpha)) * (alpha * float32(1 / levels)) + lo, alpha = max(hi - lo, 0) + 1e-10:
// tfquant.ops.quantize_in_range(x, bits, lo, hi) for scalar lo and hi, with clip=False.
class QuantizeInRangeOp : public OpKernel {
 public:
  explicit QuantizeInRangeOp(OpKernelConstruction* context) : OpKernel(context) {
    int bits = 0;
    OP_REQUIRES_OK(context, context->GetAttr("bits", &bits));
    OP_REQUIRES(context, bits >= 1 && bits <= 16,
                ::absl::InvalidArgumentError(::absl::StrCat("bits=", bits, " is not valid; expected 1 to 16")));
    levels_ = static_cast<float>((1 << bits) - 1);
    // Python's float(1 / levels) rounded to float32, as the graph's constant is.
    inverse_levels_ = static_cast<float>(1.0 / ((1 << bits) - 1));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    const Tensor& minimum = context->input(1);
    const Tensor& maximum = context->input(2);
    OP_REQUIRES(context, TensorShapeUtils::IsScalar(minimum.shape()) && TensorShapeUtils::IsScalar(maximum.shape()),
                ::absl::InvalidArgumentError("minimum and maximum must be scalars"));
    const float low = minimum.scalar<float>()();
    const float high = maximum.scalar<float>()();
    // Maximum(width, 0) keeps a NaN, as TensorFlow's Maximum does.
    float width = high - low;
    width = (std::isnan(width) || width > 0.0f) ? width : 0.0f;
    const float alpha = width + 1e-10f;
    const float scale = levels_ / alpha;
    const float step = alpha * inverse_levels_;

    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, input.shape(), &output));
    const float* x = input.flat<float>().data();
    float* y = output->flat<float>().data();
    auto work = [x, y, low, scale, step](int64_t first, int64_t last) {
      QuantizeSpan(x + first, y + first, last - first, low, scale, step);
    };
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers.num_threads, workers.workers, input.NumElements(), 4, work);
  }

 private:
  float levels_;
  float inverse_levels_;
};

::absl::Status ScalarPair(shape_inference::InferenceContext* context) {
  context->set_output(0, context->Scalar());
  context->set_output(1, context->Scalar());
  return ::absl::OkStatus();
}

::absl::Status SameAsFirstInput(shape_inference::InferenceContext* context) {
  shape_inference::ShapeHandle unused;
  TF_RETURN_IF_ERROR(context->WithRank(context->input(1), 0, &unused));
  TF_RETURN_IF_ERROR(context->WithRank(context->input(2), 0, &unused));
  context->set_output(0, context->input(0));
  return ::absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfquantMinMax")
    .Input("x: float")
    .Output("minimum: float")
    .Output("maximum: float")
    .SetShapeFn(ScalarPair);

REGISTER_OP("TfquantQuantizeInRange")
    .Input("x: float")
    .Input("minimum: float")
    .Input("maximum: float")
    .Output("y: float")
    .Attr("bits: int")
    .SetShapeFn(SameAsFirstInput);

REGISTER_KERNEL_BUILDER(Name("TfquantMinMax").Device(::tensorflow::DEVICE_CPU), MinMaxOp);
REGISTER_KERNEL_BUILDER(Name("TfquantQuantizeInRange").Device(::tensorflow::DEVICE_CPU), QuantizeInRangeOp);

}  // namespace tfquant
