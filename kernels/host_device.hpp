#pragma once
// Functions that host and device code both compile (layouts shared by a host reference and a kernel):
// __host__ __device__ under nvcc, plain C++ elsewhere.
#ifdef __CUDACC__
#define NIBBLE_HOST_DEVICE __host__ __device__
#else
#define NIBBLE_HOST_DEVICE
#endif
