// y = x @ w.T + bias for a few rows of x (a decode or tree step), float32, AVX2 + FMA.
//
// A decode step multiplies 1 to 16 rows by every weight, so it is bound by reading the weight
// from memory. This kernel reads each weight row once for all the rows of x (up to 8 at a
// time), and prefetches the weight 4 KB ahead into L2 so that the multiply-adds do not hold
// back the memory stream: on a 2-core AVX2 server core, 1 to 4 rows cost about the same.
//
// Every output element is one dot product accumulated in the same order (8 lanes over k,
// then a fixed horizontal sum, the k tail, the bias) whatever the row count and the thread
// count, so a row's result does not depend on how many rows ran with it: a tree step's
// logits equal a one-token step's bit for bit.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kPrefetchFloats = 1024;  // 4 KB ahead of the weight rows being read
constexpr int64_t kWeightBlock = 16;       // weight rows per task (stays in L2 across row chunks)
constexpr int kMaxRows = 8;                // rows of x per pass over a weight block

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ROWS rows of x against WROWS consecutive weight rows: ROWS * WROWS accumulators.
template <int ROWS, int WROWS>
inline void tile(const float* x, int64_t K, const float* w, const float* bias, float* y,
                 int64_t ldy) {
  __m256 acc[ROWS][WROWS];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < WROWS; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t k8 = K - K % 8;
  for (int64_t k = 0; k < k8; k += 8) {
    if ((k & 15) == 0)  // one prefetch per 64-byte line
      for (int j = 0; j < WROWS; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k + kPrefetchFloats),
                     _MM_HINT_T1);
    __m256 wv[WROWS];
    for (int j = 0; j < WROWS; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int j = 0; j < WROWS; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int j = 0; j < WROWS; ++j) {
      float sum = horizontal_sum(acc[r][j]);
      for (int64_t k = k8; k < K; ++k) sum += x[r * K + k] * w[j * K + k];
      if (bias != nullptr) sum += bias[j];
      y[r * ldy + j] = sum;
    }
  }
}

// ROWS rows of x against weight rows [n0, n1): pairs of weight rows while the 2 * ROWS
// accumulators fit the 16 vector registers (ROWS <= 6), single rows beyond.
template <int ROWS>
void rows_against_block(const float* x, int64_t K, const float* w, const float* bias,
                        float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int WROWS = ROWS <= 6 ? 2 : 1;
  int64_t n = n0;
  for (; n + WROWS <= n1; n += WROWS)
    tile<ROWS, WROWS>(x, K, w + n * K, bias ? bias + n : nullptr, y + n, N);
  for (; n < n1; ++n) tile<ROWS, 1>(x, K, w + n * K, bias ? bias + n : nullptr, y + n, N);
}

using RowsFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t,
                        int64_t, int64_t);
constexpr RowsFn kRowsFns[kMaxRows + 1] = {
    nullptr,
    rows_against_block<1>,
    rows_against_block<2>,
    rows_against_block<3>,
    rows_against_block<4>,
    rows_against_block<5>,
    rows_against_block<6>,
    rows_against_block<7>,
    rows_against_block<8>,
};

// x is [..., K] (any leading dims, as F.linear takes it); the result is [..., N].
at::Tensor few_row_linear(const at::Tensor& x_in, const at::Tensor& weight_in,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.dim() == 2,
              "few_row_linear: x [..., K], weight [N, K]");
  TORCH_CHECK(x_in.size(-1) == weight_in.size(1), "few_row_linear: x has ", x_in.size(-1),
              " columns, weight ", weight_in.size(1));
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_in.scalar_type() == at::kFloat,
              "few_row_linear: float32 only");
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "few_row_linear: CPU only");
  // Done here rather than in Python: each Python-side tensor call costs microseconds, and a
  // decode step makes over 200 linear calls.
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t K = x.size(-1), N = weight.size(0);
  int64_t M = 1;  // rows: the product of x's leading dims
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const float* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N,
                "few_row_linear: bias must be float32 [N]");
    bias_c = bias->contiguous();
    bias_ptr = bias_c.data_ptr<float>();
  }
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kWeightBlock - 1) / kWeightBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kWeightBlock, n1 = std::min(N, n0 + kWeightBlock);
      for (int64_t m = 0; m < M; m += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, M - m);
        kRowsFns[rows](xp + m * K, K, wp, bias_ptr, yp + m * N, N, n0, n1);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(msn_cpu, m) {
  m.def("few_row_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &few_row_linear);
}
