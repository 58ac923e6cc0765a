/* N:M scores of one group, shared by the C++ CPU kernel (ops.cpp) and the CUDA kernel.
 *
 * Header-only, no torch and no CUDA header. Semantics are autoprune_ext.reference.nm_scores: the
 * top-n of the m values are kept (ties: the lower index wins), the threshold t is the midpoint of
 * the n-th and (n+1)-th largest values (n == m: the smallest), and S = v - t clamped to >= +0 for
 * kept entries and <= -tiny (the output dtype's smallest normal) for the others.
 */
#ifndef AUTOPRUNE_NM_GROUP_H_
#define AUTOPRUNE_NM_GROUP_H_

#if defined(__CUDACC__)
#define AP_HD __host__ __device__ __forceinline__
#else
#define AP_HD inline
#endif

/* largest group size m (reference.NM_MAX_M): a group lives in registers / on the stack */
#define AP_NM_MAX_M 32

template <typename CT>
AP_HD void ap_nm_group(const CT* v, CT* s, int n, int m, CT tiny) {
  int rank[AP_NM_MAX_M];
  CT vn = v[0], vn1 = v[0];
  for (int j = 0; j < m; ++j) {
    int r = 0;
    for (int k = 0; k < m; ++k) r += (v[k] > v[j]) || (v[k] == v[j] && k < j);
    rank[j] = r;
    if (r == n - 1) vn = v[j];
    if (r == n) vn1 = v[j];
  }
  /* halves: no overflow near the dtype's largest value; the same rounding as the reference */
  const CT t = n == m ? vn : vn / CT(2) + vn1 / CT(2);
  for (int j = 0; j < m; ++j) {
    const CT d = v[j] - t;
    s[j] = rank[j] < n ? (d < CT(0) ? CT(0) : d) : (d > -tiny ? -tiny : d);
  }
}

#endif /* AUTOPRUNE_NM_GROUP_H_ */
