/* N:M scores of one group, shared by the C++ CPU kernel (ops.cpp) and the CUDA kernel.
 *
 * Header-only, no torch and no CUDA header. Semantics are autoprune_ext.reference.nm_scores: the
 * top-n of the m values are kept (ties: the lower index wins), the threshold t is the midpoint of
 * the n-th and (n+1)-th largest values (n == m: the smallest), and S = v - t clamped to >= +0 for
 * kept entries and <= -tiny (the output dtype's smallest normal) for the others. The order is that of
 * torch.sort: -0 == +0, NaN above +inf (NaNs tie), so a NaN in a group is kept first and a NaN
 * threshold makes the group's scores NaN, as in the reference. Exact comparisons: no fast-math.
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

/* whether v[k] comes before v[j] in torch.sort(descending=True, stable=True): larger, or equal (-0 == +0)
 * with the lower index; NaN is larger than everything else and NaNs are equal, so the ranks are a
 * permutation of 0..m-1 whatever the values */
template <typename CT>
AP_HD bool ap_nm_before(CT vk, int k, CT vj, int j) {
  const bool nk = vk != vk, nj = vj != vj;
  if (nk || nj) return nk && (!nj || k < j);
  return vk > vj || (vk == vj && k < j);
}

template <typename CT>
AP_HD void ap_nm_group(const CT* v, CT* s, int n, int m, CT tiny) {
  int rank[AP_NM_MAX_M];
  CT vn = v[0], vn1 = v[0];
  for (int j = 0; j < m; ++j) {
    int r = 0;
    for (int k = 0; k < m; ++k) r += ap_nm_before(v[k], k, v[j], j);
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
