#include "kernels/int4_groups.hpp"

#include <algorithm>
#include <cstring>

namespace nibble::kernels {

namespace {

bool valid_group(int64_t n_out, int64_t k, int64_t group) {
  return n_out >= 0 && k >= 0 && (group == 32 || group == 64 || group == 128) && k % group == 0;
}

// Block b of a row, as (scale bits, 32 signed values in element order).
struct Run {
  uint16_t d = 0;
  int8_t v[kQK4_0] = {};
};

Run run_of(DType type, const void* blocks, int64_t index) {
  Run out;
  if (type == DType::Q4_0) {
    const BlockQ4_0& b = static_cast<const BlockQ4_0*>(blocks)[index];
    out.d = b.d;
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      out.v[j] = static_cast<int8_t>((b.qs[j] & 0xF) - 8);
      out.v[j + kQK4_0 / 2] = static_cast<int8_t>((b.qs[j] >> 4) - 8);
    }
  } else {
    const BlockQ8_0& b = static_cast<const BlockQ8_0*>(blocks)[index];
    out.d = b.d;
    std::memcpy(out.v, b.qs, kQK8_0);
  }
  return out;
}

// The zero of a group whose values span [lo, hi], or -1 when no zero in 0..31 puts them in 0..15.
int zero_for(int lo, int hi) {
  if (lo >= -8 && hi <= 7) return 8;
  const int z = std::max(0, -lo);
  return z <= 31 && hi + z <= 15 ? z : -1;
}

// Whether row r's group g (runs [g * per, (g + 1) * per)) has one scale and a zero; sets both.
bool group_fits(DType type, const void* blocks, int64_t first_run, int64_t per, uint16_t* d, int* zero) {
  int lo = 127, hi = -128;
  for (int64_t b = 0; b < per; ++b) {
    const Run run = run_of(type, blocks, first_run + b);
    if (b == 0) *d = run.d;
    if (run.d != *d) return false;
    for (const int8_t v : run.v) {
      lo = std::min<int>(lo, v);
      hi = std::max<int>(hi, v);
    }
  }
  *zero = zero_for(lo, hi);
  return *zero >= 0;
}

}  // namespace

int64_t int4_group_size(DType type, const void* blocks, int64_t n_out, int64_t k) {
  if (blocks == nullptr || (type != DType::Q4_0 && type != DType::Q8_0)) return 0;
  for (const int64_t group : {int64_t{128}, int64_t{64}, int64_t{32}}) {
    if (!valid_group(n_out, k, group)) continue;
    const int64_t per = group / kQK4_0;
    const int64_t groups = n_out * (k / group);
    bool fits = true;
    for (int64_t g = 0; g < groups && fits; ++g) {
      uint16_t d = 0;
      int zero = 0;
      fits = group_fits(type, blocks, g * per, per, &d, &zero);
    }
    if (fits) return group;
  }
  return 0;
}

Status int4_groups_from_blocks(DType type, const void* blocks, int64_t n_out, int64_t k, int64_t group,
                               uint8_t* quants, uint16_t* scales, uint8_t* zeros) {
  if (blocks == nullptr || quants == nullptr || scales == nullptr || zeros == nullptr) {
    return Status::invalid_argument;
  }
  if ((type != DType::Q4_0 && type != DType::Q8_0) || !valid_group(n_out, k, group)) {
    return Status::invalid_argument;
  }
  const int64_t per = group / kQK4_0;
  const int64_t groups = n_out * (k / group);  // rows are whole groups: groups are consecutive
  for (int64_t g = 0; g < groups; ++g) {
    uint16_t d = 0;
    int zero = 0;
    if (!group_fits(type, blocks, g * per, per, &d, &zero)) return Status::invalid_argument;
    scales[g] = d;
    zeros[g] = static_cast<uint8_t>(zero);
    for (int64_t b = 0; b < per; ++b) {
      const Run run = run_of(type, blocks, g * per + b);
      uint8_t* out = quants + (g * per + b) * (kQK4_0 / 2);
      for (int j = 0; j < kQK4_0 / 2; ++j) {
        const int lo = run.v[j] + zero;
        const int hi = run.v[j + kQK4_0 / 2] + zero;
        out[j] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
  return Status::ok;
}

Status dequantize_int4_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                              int64_t n_out, int64_t k, int64_t group, float* y) {
  if (quants == nullptr || scales == nullptr || zeros == nullptr || y == nullptr)
    return Status::invalid_argument;
  if (!valid_group(n_out, k, group)) return Status::invalid_argument;
  const int64_t runs = n_out * (k / kQK4_0);
  const int64_t per = group / kQK4_0;
  for (int64_t b = 0; b < runs; ++b) {
    const float s = fp16_to_fp32(scales[b / per]);
    const int z = zeros[b / per];
    const uint8_t* q = quants + b * (kQK4_0 / 2);
    float* out = y + b * kQK4_0;
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      out[j] = static_cast<float>((q[j] & 0xF) - z) * s;
      out[j + kQK4_0 / 2] = static_cast<float>((q[j] >> 4) - z) * s;
    }
  }
  return Status::ok;
}

}  // namespace nibble::kernels
