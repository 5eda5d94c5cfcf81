// Descriptor terms and their first derivatives on the CPU: the QM angular, MM angular and MM radial terms
// (qmlmm.descriptors.terms.QMAngular, MMAngular, MMRadial) and the exact potential and field of the MM
// charges at the QM atoms (LongRange), and the pair lists within a cutoff; each kernel's sums are written out
// above it.
//
// QM angular: for every centre i and every two of its QM neighbours j < k (vectors d = r_j - r_i within the
// QM angular cutoff, taken in the order of the pair list):
//   out[i * n_ep + pair(e_j, e_k), zl, s] += 2^(1-z) max(0, 1 + lam cos)^z exp(-((r_ij + r_ik)/2 - R_s)^2 / (2 w^2))
//                                            f(r_ij) f(r_ik)
// MM angular: for every QM pair p = (i, j) (vector d_p = r_j - r_i) and every MM atom K near its centre i
// (vector v_K = r_K - r_i, channel weights w_Kc: the charge, or its positive and negative parts):
//   out[i * n_el + e_j, zl, c, s] += f_q(r_p) 2^(1-z) (1 + lam cos)^z f_m(r_K) w_Kc
//                                    exp(-((r_p + r_K)/2 - R_s)^2 / (2 w^2))
// with cos = u_p . u_K clamped to [-1, 1].
// f are cosine cutoffs. Pairs and MM atoms (and, for the field, the atoms of each frame) come sorted by centre, with CSR offsets per centre, so that one
// thread owns each centre's rows and gradients: no atomics, the same sums in the same order for any thread
// count. Gradients are the analytic first derivatives, with torch.clamp's convention (none through a
// clamped value); there is no second derivative (training, whose force loss needs one, uses torch's ops).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline void cutoff_and_slope(T r, T rc, T& f, T& df) {
  if (r >= rc) { f = 0; df = 0; return; }
  const T a = static_cast<T>(M_PI) / rc;
  f = static_cast<T>(0.5) * (std::cos(a * r) + 1);
  df = static_cast<T>(-0.5) * a * std::sin(a * r);
}

// base^z for base >= 0 and its derivative z base^(z-1); whole z by products as torch's _power, else pow
template <typename T>
inline void power_and_slope(T base, T z, int zi, T& p, T& dp) {
  if (zi > 0) {
    T q = 1;  // base^(z-1)
    for (int n = 1; n < zi; ++n) q *= base;
    p = q * base;
    dp = z * q;
  } else {
    p = std::pow(base, z);
    dp = z * std::pow(base, z - 1);
  }
}

struct Geometry {
  // per vector: length, unit vector, cutoff and its slope
  template <typename T>
  static void of(const T* v, T rc, T& r, T u[3], T& f, T& df) {
    r = std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
    for (int k = 0; k < 3; ++k) u[k] = v[k] / r;
    cutoff_and_slope(r, rc, f, df);
  }
};

template <typename T>
struct Settings {
  const T* shifts; int ns;
  const T* zetas; const T* lams; const int* zint; int nzl;
  int nc;
  T inv_w2;  // 1 / w^2
  T cutoff, qm_cutoff;
  // the MM term's Gaussians as products A_t(r_p) B_t(r_K) C(r_p, r_K), one exp per pair instead of one per
  // shift: exp(-(a + b - R)^2 / (2 w^2)) = exp(-(a - R)^2 / (2 w^2)) exp((-b^2 / 2 + R b) / w^2) exp(-a b / w^2)
  // with a = r_p / 2, b = r_K / 2; only where no factor can leave the floating-point range (settings_of)
  bool factor;
};

// A_t = exp(-(r/2 - R_t)^2 / (2 w^2)) of a QM pair's length r
template <typename T>
inline void gauss_a(const Settings<T>& s, int ns, T r, T* A) {
  for (int t = 0; t < ns; ++t) {
    const T x = static_cast<T>(0.5) * r - s.shifts[t];
    A[t] = std::exp(static_cast<T>(-0.5) * x * x * s.inv_w2);
  }
}

// B_t = exp((-b^2 / 2 + R_t b) / w^2), b = r / 2, of an MM neighbour's distance r
template <typename T>
inline void gauss_b(const Settings<T>& s, int ns, T r, T* B) {
  const T b = static_cast<T>(0.5) * r;
  for (int t = 0; t < ns; ++t) B[t] = std::exp((static_cast<T>(-0.5) * b * b + s.shifts[t] * b) * s.inv_w2);
}

// g_t = exp(-(rm - R_t)^2 / (2 w^2)) of a mean distance rm, one exp per shift
template <typename T>
inline void gaussians_of_mean(const Settings<T>& s, int ns, T rm, T* g) {
  for (int t = 0; t < ns; ++t) {
    const T x = rm - s.shifts[t];
    g[t] = std::exp(static_cast<T>(-0.5) * x * x * s.inv_w2);
  }
}

// g_t = exp(-((r_p + r_K)/2 - R_t)^2 / (2 w^2)), from the factors where they apply
template <typename T>
inline void gaussians(const Settings<T>& s, int ns, T rp, T rk, const T* A, const T* B, T* g) {
  if (!s.factor) return gaussians_of_mean(s, ns, static_cast<T>(0.5) * (rp + rk), g);
  const T c = std::exp(-(static_cast<T>(0.25) * rp * rk) * s.inv_w2);
  for (int t = 0; t < ns; ++t) g[t] = A[t] * B[t] * c;
}

// the vectors k0..k1-1 of one centre (its QM pairs, or its MM neighbours): length, unit vector, cutoff and
// its slope, each computed once per centre, not once per pair of them
template <typename T>
struct Vectors {
  std::vector<T> r, u, f, df;
  void fill(const T* v, int64_t k0, int64_t k1, T rc) {
    const int64_t n = k1 - k0;
    r.resize(n); u.resize(3 * n); f.resize(n); df.resize(n);
    for (int64_t k = 0; k < n; ++k) Geometry::of(v + 3 * (k0 + k), rc, r[k], &u[3 * k], f[k], df[k]);
  }
};

// the MM neighbours of one centre, with the factors B_t of their Gaussians where those apply
template <typename T>
struct Neighbourhood : Vectors<T> {
  std::vector<T> B;
  void fill(const T* cvec, int64_t k0, int64_t k1, const Settings<T>& s) {
    Vectors<T>::fill(cvec, k0, k1, s.cutoff);
    B.resize((k1 - k0) * s.ns);  // sized either way: the kernels take a pointer to each neighbour's row
    if (!s.factor) return;
    for (int64_t k = 0; k < k1 - k0; ++k) gauss_b(s, s.ns, this->r[k], &B[k * s.ns]);
  }
};

// largest sizes of the per-pair buffers (checked before a kernel runs)
constexpr int MAX_ZL = 16, MAX_C = 2, MAX_S = 32;

// NZL, NC, NS: the sizes (zeta-lambda pairs, channels, shifts) where known when compiled (0: read from s), so
// that the default settings' loops unroll and their buffers stay in registers
template <typename T, int NZL, int NC, int NS>
void forward_kernel(const int64_t* a_ptr, const int64_t* c_ptr, const int64_t* arow, const T* ad, const T* cvec,
                    const T* wq, T* out, int64_t n_centres, const Settings<T>& s) {
  const int ns = NS ? NS : s.ns, nc = NC ? NC : s.nc, nzl = NZL ? NZL : s.nzl, nf = nzl * nc * ns;
  at::parallel_for(0, n_centres, 1, [&](int64_t c0, int64_t c1) {
    T a[MAX_ZL], g[MAX_S], wg[MAX_C * MAX_S], nrm[MAX_ZL], A[MAX_S];
    for (int z = 0; z < nzl; ++z) nrm[z] = std::exp2(1 - s.zetas[z]);
    Neighbourhood<T> nb;
    for (int64_t i = c0; i < c1; ++i) {
      if (a_ptr[i] == a_ptr[i + 1] || c_ptr[i] == c_ptr[i + 1]) continue;
      nb.fill(cvec, c_ptr[i], c_ptr[i + 1], s);
      for (int64_t p = a_ptr[i]; p < a_ptr[i + 1]; ++p) {
        T rp, up[3], fq, dfq;
        Geometry::of(ad + 3 * p, s.qm_cutoff, rp, up, fq, dfq);
        if (fq == 0) continue;
        if (s.factor) gauss_a(s, ns, rp, A);
        T* o = out + arow[p] * nf;
        for (int64_t kk = 0, k = c_ptr[i]; k < c_ptr[i + 1]; ++k, ++kk) {
          const T fm = nb.f[kk];
          if (fm == 0) continue;
          const T* uk = &nb.u[3 * kk];
          T cs = up[0] * uk[0] + up[1] * uk[1] + up[2] * uk[2];
          cs = cs > 1 ? 1 : (cs < -1 ? -1 : cs);
          for (int z = 0; z < nzl; ++z) {
            T p_, dp_;
            power_and_slope<T>(1 + s.lams[z] * cs, s.zetas[z], s.zint[z], p_, dp_);
            a[z] = fq * nrm[z] * p_;
          }
          gaussians(s, ns, rp, nb.r[kk], A, &nb.B[kk * ns], g);
          for (int c = 0; c < nc; ++c) {
            const T w = fm * wq[k * nc + c];
            for (int t = 0; t < ns; ++t) wg[c * ns + t] = w * g[t];
          }
          for (int z = 0; z < nzl; ++z)
            for (int m = 0; m < nc * ns; ++m) o[z * nc * ns + m] += a[z] * wg[m];
        }
      }
    }
  });
}

template <typename T, int NZL, int NC, int NS>
void backward_kernel(const int64_t* a_ptr, const int64_t* c_ptr, const int64_t* arow, const T* ad, const T* cvec,
                     const T* wq, const T* gout, T* gad, T* gcvec, T* gwq, int64_t n_centres, const Settings<T>& s) {
  const int ns = NS ? NS : s.ns, nc = NC ? NC : s.nc, nzl = NZL ? NZL : s.nzl, nf = nzl * nc * ns;
  at::parallel_for(0, n_centres, 1, [&](int64_t c0, int64_t c1) {
    T a[MAX_ZL], da[MAX_ZL], g[MAX_S], dg[MAX_S], h[MAX_ZL * MAX_S], dw[MAX_C], nrm[MAX_ZL], A[MAX_S];
    for (int z = 0; z < nzl; ++z) nrm[z] = std::exp2(1 - s.zetas[z]);
    Neighbourhood<T> nb;
    for (int64_t i = c0; i < c1; ++i) {
      if (a_ptr[i] == a_ptr[i + 1] || c_ptr[i] == c_ptr[i + 1]) continue;
      nb.fill(cvec, c_ptr[i], c_ptr[i + 1], s);
      for (int64_t p = a_ptr[i]; p < a_ptr[i + 1]; ++p) {
        T rp, up[3], fq, dfq;
        Geometry::of(ad + 3 * p, s.qm_cutoff, rp, up, fq, dfq);
        if (fq == 0 && dfq == 0) continue;
        if (s.factor) gauss_a(s, ns, rp, A);
        const T* G = gout + arow[p] * nf;
        T grp = 0, gup[3] = {0, 0, 0};  // dL/dr_p, dL/du_p (the part through cos)
        for (int64_t kk = 0, k = c_ptr[i]; k < c_ptr[i + 1]; ++k, ++kk) {
          const T rk = nb.r[kk], fm = nb.f[kk], dfm = nb.df[kk];
          if (fm == 0 && dfm == 0) continue;
          const T* uk = &nb.u[3 * kk];
          const T* wk = wq + k * nc;
          T cs = up[0] * uk[0] + up[1] * uk[1] + up[2] * uk[2];
          const bool clamped = cs > 1 || cs < -1;
          cs = cs > 1 ? 1 : (cs < -1 ? -1 : cs);
          for (int z = 0; z < nzl; ++z) {
            T p_, dp_;
            power_and_slope<T>(1 + s.lams[z] * cs, s.zetas[z], s.zint[z], p_, dp_);
            a[z] = nrm[z] * p_;              // without f_q
            da[z] = nrm[z] * dp_ * s.lams[z];  // d a / d cos
          }
          const T rm = static_cast<T>(0.5) * (rp + rk);
          gaussians(s, ns, rp, rk, A, &nb.B[kk * ns], g);
          // one pass over G (nzl, C, ns): h[z, t] = f_m sum_c G[z, c, t] wq_c and
          // dw_c = f_q sum_{z,t} G[z, c, t] a_z g_t (dL/dw_c, w_c = f_m wq_c)
          for (int c = 0; c < nc; ++c) dw[c] = 0;
          for (int z = 0; z < nzl; ++z) {
            for (int t = 0; t < ns; ++t) h[z * ns + t] = 0;
            for (int c = 0; c < nc; ++c) {
              const T* Gzc = G + (z * nc + c) * ns;
              const T wc = wk[c];
              T acc = 0;
              for (int t = 0; t < ns; ++t) {
                h[z * ns + t] += Gzc[t] * wc;
                acc += Gzc[t] * g[t];
              }
              dw[c] += acc * a[z];
            }
          }
          T dcos = 0, dfq_acc = 0;
          for (int t = 0; t < ns; ++t) dg[t] = 0;
          for (int z = 0; z < nzl; ++z) {
            T hz = 0;
            for (int t = 0; t < ns; ++t) {
              hz += h[z * ns + t] * g[t];
              dg[t] += h[z * ns + t] * a[z];
            }
            dcos += hz * da[z];
            dfq_acc += hz * a[z];
          }
          dcos *= fm * fq;
          dfq_acc *= fm;
          for (int c = 0; c < nc; ++c) dw[c] *= fq;
          T drm = 0;  // dL/d((r_p + r_K)/2)
          for (int t = 0; t < ns; ++t) drm += dg[t] * g[t] * (-(rm - s.shifts[t]) * s.inv_w2);
          drm *= fq * fm;
          T grk = static_cast<T>(0.5) * drm;
          for (int c = 0; c < nc; ++c) {
            grk += dw[c] * wk[c] * dfm;
            gwq[k * nc + c] += dw[c] * fm;
          }
          grp += static_cast<T>(0.5) * drm + dfq_acc * dfq;
          if (clamped) dcos = 0;
          // cos = u_p . u_K: dL/du_p += dcos u_K, dL/du_K = dcos u_p; then through the unit vectors
          T* gv = gcvec + 3 * k;
          for (int d = 0; d < 3; ++d) {
            gup[d] += dcos * uk[d];
            gv[d] += grk * uk[d] + dcos * (up[d] - cs * uk[d]) / rk;
          }
        }
        // d u_p / d d_p = (I - u u^T) / r_p
        const T gu_dot = gup[0] * up[0] + gup[1] * up[1] + gup[2] * up[2];
        T* gd = gad + 3 * p;
        for (int d = 0; d < 3; ++d) gd[d] += grp * up[d] + (gup[d] - gu_dot * up[d]) / rp;
      }
    }
  });
}

template <typename T>
void qm_forward_kernel(const int64_t* a_ptr, const int64_t* el, const int64_t* pidx, int64_t n_el, int64_t n_ep,
                       const T* ad, T* out, int64_t n_centres, const Settings<T>& s) {
  const int ns = s.ns, nzl = s.nzl, nf = nzl * ns;
  at::parallel_for(0, n_centres, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> a(nzl), g(ns), nrm(nzl);
    for (int z = 0; z < nzl; ++z) nrm[z] = std::exp2(1 - s.zetas[z]);
    Vectors<T> pr;
    for (int64_t i = c0; i < c1; ++i) {
      const int64_t p0 = a_ptr[i], n = a_ptr[i + 1] - p0;
      if (n < 2) continue;
      pr.fill(ad, p0, p0 + n, s.qm_cutoff);
      for (int64_t x = 0; x < n; ++x) {
        if (pr.f[x] == 0) continue;
        const T* ux = &pr.u[3 * x];
        for (int64_t y = x + 1; y < n; ++y) {
          const T fxy = pr.f[x] * pr.f[y];
          if (fxy == 0) continue;
          const T* uy = &pr.u[3 * y];
          const T cs = ux[0] * uy[0] + ux[1] * uy[1] + ux[2] * uy[2];
          for (int z = 0; z < nzl; ++z) {
            T base = 1 + s.lams[z] * cs, p_, dp_;
            if (base < 0) base = 0;
            power_and_slope<T>(base, s.zetas[z], s.zint[z], p_, dp_);
            a[z] = fxy * nrm[z] * p_;
          }
          const T rm = static_cast<T>(0.5) * (pr.r[x] + pr.r[y]);
          gaussians_of_mean(s, ns, rm, g.data());
          T* o = out + (i * n_ep + pidx[el[p0 + x] * n_el + el[p0 + y]]) * nf;
          for (int z = 0; z < nzl; ++z)
            for (int t = 0; t < ns; ++t) o[z * ns + t] += a[z] * g[t];
        }
      }
    }
  });
}

template <typename T>
void qm_backward_kernel(const int64_t* a_ptr, const int64_t* el, const int64_t* pidx, int64_t n_el, int64_t n_ep,
                        const T* ad, const T* gout, T* gad, int64_t n_centres, const Settings<T>& s) {
  const int ns = s.ns, nzl = s.nzl, nf = nzl * ns;
  at::parallel_for(0, n_centres, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> a(nzl), da(nzl), g(ns), nrm(nzl), gr, gu;
    for (int z = 0; z < nzl; ++z) nrm[z] = std::exp2(1 - s.zetas[z]);
    Vectors<T> pr;
    for (int64_t i = c0; i < c1; ++i) {
      const int64_t p0 = a_ptr[i], n = a_ptr[i + 1] - p0;
      if (n < 2) continue;
      pr.fill(ad, p0, p0 + n, s.qm_cutoff);
      gr.assign(n, 0);
      gu.assign(3 * n, 0);
      for (int64_t x = 0; x < n; ++x) {
        if (pr.f[x] == 0 && pr.df[x] == 0) continue;
        const T* ux = &pr.u[3 * x];
        for (int64_t y = x + 1; y < n; ++y) {
          if (pr.f[y] == 0 && pr.df[y] == 0) continue;
          const T* uy = &pr.u[3 * y];
          const T cs = ux[0] * uy[0] + ux[1] * uy[1] + ux[2] * uy[2];
          for (int z = 0; z < nzl; ++z) {
            T base = 1 + s.lams[z] * cs, p_, dp_;
            const bool clamped = base < 0;
            if (clamped) base = 0;
            power_and_slope<T>(base, s.zetas[z], s.zint[z], p_, dp_);
            a[z] = nrm[z] * p_;
            da[z] = clamped ? 0 : nrm[z] * dp_ * s.lams[z];
          }
          const T rm = static_cast<T>(0.5) * (pr.r[x] + pr.r[y]);
          gaussians_of_mean(s, ns, rm, g.data());
          const T* G = gout + (i * n_ep + pidx[el[p0 + x] * n_el + el[p0 + y]]) * nf;
          T dcos = 0, dF = 0, drm = 0;
          for (int z = 0; z < nzl; ++z) {
            T hz = 0, hg = 0;
            for (int t = 0; t < ns; ++t) {
              const T gg = G[z * ns + t] * g[t];
              hz += gg;
              hg += gg * (-(rm - s.shifts[t]) * s.inv_w2);
            }
            dcos += hz * da[z];
            dF += hz * a[z];
            drm += hg * a[z];
          }
          const T fxy = pr.f[x] * pr.f[y];
          dcos *= fxy;
          drm *= fxy;
          gr[x] += static_cast<T>(0.5) * drm + dF * pr.df[x] * pr.f[y];
          gr[y] += static_cast<T>(0.5) * drm + dF * pr.f[x] * pr.df[y];
          for (int d = 0; d < 3; ++d) {
            gu[3 * x + d] += dcos * uy[d];
            gu[3 * y + d] += dcos * ux[d];
          }
        }
      }
      for (int64_t x = 0; x < n; ++x) {
        const T* ux = &pr.u[3 * x];
        const T* gx = &gu[3 * x];
        const T dot = gx[0] * ux[0] + gx[1] * ux[1] + gx[2] * ux[2];
        T* o = gad + 3 * (p0 + x);
        for (int d = 0; d < 3; ++d) o[d] += gr[x] * ux[d] + (gx[d] - dot * ux[d]) / pr.r[x];
      }
    }
  });
}

// whether the factors' exponents stay within +-30 (float32 holds e^+-87): B's is at most max|R| b / w^2 and
// C's at most a b / w^2 (a <= qm_cutoff / 2, b <= cutoff / 2); A's is negative, and where A underflows the true
// Gaussian is below e^-57
inline bool factor_fits(const torch::Tensor& shifts, double width, double cutoff, double qm_cutoff) {
  const double rmax = shifts.numel() ? shifts.abs().max().item<double>() : 0.0;
  return (rmax + 0.5 * qm_cutoff) * 0.5 * cutoff / (width * width) < 30.0;
}

// MM radial: out[i, c, t] += f(r_iK) w_Kc exp(-(r_iK - R_t)^2 / (2 w^2)) over the QM-MM pairs of each centre
template <typename T>
void mm_radial_forward_kernel(const int64_t* c_ptr, const T* r, const T* wq, T* out, int64_t n_centres, int nc,
                              const Settings<T>& s) {
  const int ns = s.ns;
  at::parallel_for(0, n_centres, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t i = c0; i < c1; ++i) {
      T* o = out + i * nc * ns;
      for (int64_t k = c_ptr[i]; k < c_ptr[i + 1]; ++k) {
        T f, df;
        cutoff_and_slope(r[k], s.cutoff, f, df);
        if (f == 0) continue;
        for (int t = 0; t < ns; ++t) {
          const T x = r[k] - s.shifts[t];
          const T g = f * std::exp(static_cast<T>(-0.5) * x * x * s.inv_w2);
          for (int c = 0; c < nc; ++c) o[c * ns + t] += wq[k * nc + c] * g;
        }
      }
    }
  });
}

template <typename T>
void mm_radial_backward_kernel(const int64_t* c_ptr, const T* r, const T* wq, const T* gout, T* gr, T* gwq,
                               int64_t n_centres, int nc, const Settings<T>& s) {
  const int ns = s.ns;
  at::parallel_for(0, n_centres, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t i = c0; i < c1; ++i) {
      const T* G = gout + i * nc * ns;
      for (int64_t k = c_ptr[i]; k < c_ptr[i + 1]; ++k) {
        T f, df;
        cutoff_and_slope(r[k], s.cutoff, f, df);
        if (f == 0 && df == 0) continue;
        T dr = 0;
        for (int t = 0; t < ns; ++t) {
          const T x = r[k] - s.shifts[t];
          const T g = std::exp(static_cast<T>(-0.5) * x * x * s.inv_w2);
          T gw = 0;  // sum_c G[c, t] w_c
          for (int c = 0; c < nc; ++c) {
            gw += G[c * ns + t] * wq[k * nc + c];
            gwq[k * nc + c] += G[c * ns + t] * f * g;
          }
          dr += gw * g * (df - f * x * s.inv_w2);
        }
        gr[k] += dr;
      }
    }
  });
}

// The potential phi_i = sum_J q_J / r_iJ and field E_i = sum_J q_J (r_i - r_J) / r_iJ^3 of the MM charges at
// every QM atom, over the pairs of each frame (atoms sorted by frame, CSR offsets per frame); MM positions
// as three contiguous coordinate arrays. The backward pass runs once over the pairs, in blocks of QM atoms
// (FIELD_BLOCK), so that every entry has one owner thread.
template <typename T>
void field_forward_kernel(const int64_t* qptr, const int64_t* mptr, int64_t n_frames, const T* qpos, const T* mx,
                          const T* my, const T* mz, const T* q, T* phi, T* field) {
  for (int64_t f = 0; f < n_frames; ++f) {
    const int64_t m0 = mptr[f], m1 = mptr[f + 1];
    at::parallel_for(qptr[f], qptr[f + 1], 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T xi = qpos[3 * i], yi = qpos[3 * i + 1], zi = qpos[3 * i + 2];
        T p = 0, ex = 0, ey = 0, ez = 0;
        for (int64_t j = m0; j < m1; ++j) {
          const T dx = xi - mx[j], dy = yi - my[j], dz = zi - mz[j];
          const T inv = 1 / std::sqrt(dx * dx + dy * dy + dz * dz);
          const T qi = q[j] * inv, qi3 = qi * inv * inv;
          p += qi;
          ex += qi3 * dx;
          ey += qi3 * dy;
          ez += qi3 * dz;
        }
        phi[i] = p;
        field[3 * i] = ex;
        field[3 * i + 1] = ey;
        field[3 * i + 2] = ez;
      }
    });
  }
}

// QM atoms per block of the backward pass: each block sums its MM atoms' gradients into a buffer of its own,
// and the buffers are added in block order, so the result does not depend on the thread count
constexpr int64_t FIELD_BLOCK = 8;

template <typename T>
void field_backward_kernel(const int64_t* qptr, const int64_t* mptr, int64_t n_frames, const T* qpos, const T* mx,
                           const T* my, const T* mz, const T* q, const T* gphi, const T* gfield, T* gqpos, T* gmpos,
                           T* gq) {
  // d/dr_i of q_J (gphi / r + gE . d / r^3) with d = r_i - r_J: q_J (-gphi d / r^3 + gE / r^3 - 3 (gE . d) d / r^5);
  // the MM atom's position gets minus that, its charge gphi / r + (gE . d) / r^3
  for (int64_t f = 0; f < n_frames; ++f) {
    const int64_t q0 = qptr[f], q1 = qptr[f + 1], m0 = mptr[f], m1 = mptr[f + 1], nm = m1 - m0;
    const int64_t n_blocks = (q1 - q0 + FIELD_BLOCK - 1) / FIELD_BLOCK;
    if (n_blocks == 0 || nm == 0) continue;
    std::vector<T> buf(n_blocks * nm * 4, 0);  // per block: (x, y, z, charge) of every MM atom, without q_J
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        T* acc = &buf[blk * nm * 4];
        for (int64_t i = q0 + blk * FIELD_BLOCK; i < std::min(q1, q0 + (blk + 1) * FIELD_BLOCK); ++i) {
          const T xi = qpos[3 * i], yi = qpos[3 * i + 1], zi = qpos[3 * i + 2];
          const T gp = gphi[i], gx = gfield[3 * i], gy = gfield[3 * i + 1], gz = gfield[3 * i + 2];
          T ax = 0, ay = 0, az = 0;
          for (int64_t j = m0; j < m1; ++j) {
            const T dx = xi - mx[j], dy = yi - my[j], dz = zi - mz[j];
            const T inv = 1 / std::sqrt(dx * dx + dy * dy + dz * dz);
            const T inv2 = inv * inv, inv3 = inv2 * inv;
            const T ged = gx * dx + gy * dy + gz * dz;
            const T c = inv3 * (-gp - 3 * ged * inv2);
            const T vx = c * dx + inv3 * gx, vy = c * dy + inv3 * gy, vz = c * dz + inv3 * gz;
            ax += q[j] * vx;
            ay += q[j] * vy;
            az += q[j] * vz;
            T* a = acc + 4 * (j - m0);
            a[0] += vx;
            a[1] += vy;
            a[2] += vz;
            a[3] += gp * inv + ged * inv3;
          }
          gqpos[3 * i] = ax;
          gqpos[3 * i + 1] = ay;
          gqpos[3 * i + 2] = az;
        }
      }
    });
    at::parallel_for(m0, m1, 256, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T ax = 0, ay = 0, az = 0, aq = 0;
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          const T* a = &buf[(blk * nm + (j - m0)) * 4];
          ax += a[0];
          ay += a[1];
          az += a[2];
          aq += a[3];
        }
        gmpos[3 * j] = -q[j] * ax;
        gmpos[3 * j + 1] = -q[j] * ay;
        gmpos[3 * j + 2] = -q[j] * az;
        gq[j] = aq;
      }
    });
  }
}

template <typename T>
Settings<T> settings_of(const torch::Tensor& shifts, const torch::Tensor& zetas, const torch::Tensor& lams,
                        const torch::Tensor& zint, int64_t nc, double width, double cutoff, double qm_cutoff) {
  TORCH_CHECK(zetas.numel() <= MAX_ZL && shifts.numel() <= MAX_S && nc <= MAX_C,
              "angular kernels: at most ", MAX_ZL, " zeta-lambda pairs, ", MAX_S, " shifts and ", MAX_C, " channels");
  return Settings<T>{shifts.data_ptr<T>(), static_cast<int>(shifts.numel()),
                     zetas.data_ptr<T>(), lams.data_ptr<T>(), zint.data_ptr<int>(), static_cast<int>(zetas.numel()),
                     static_cast<int>(nc), static_cast<T>(1.0 / (width * width)),
                     static_cast<T>(cutoff), static_cast<T>(qm_cutoff), factor_fits(shifts, width, cutoff, qm_cutoff)};
}

}  // namespace

torch::Tensor mm_angular_forward(torch::Tensor a_ptr, torch::Tensor c_ptr, torch::Tensor arow, torch::Tensor ad,
                                 torch::Tensor cvec, torch::Tensor wq, torch::Tensor shifts, torch::Tensor zetas,
                                 torch::Tensor lams, torch::Tensor zint, int64_t n_rows, double width, double cutoff,
                                 double qm_cutoff) {
  const int64_t nc = wq.size(1);
  auto out = torch::zeros({n_rows, zetas.numel() * nc * shifts.numel()}, ad.options());
  AT_DISPATCH_FLOATING_TYPES(ad.scalar_type(), "mm_angular_forward", [&] {
    auto s = settings_of<scalar_t>(shifts, zetas, lams, zint, nc, width, cutoff, qm_cutoff);
    auto run = [&](auto kernel) {
      kernel(a_ptr.data_ptr<int64_t>(), c_ptr.data_ptr<int64_t>(), arow.data_ptr<int64_t>(), ad.data_ptr<scalar_t>(),
             cvec.data_ptr<scalar_t>(), wq.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), a_ptr.numel() - 1, s);
    };
    if (s.nzl == 4 && s.nc == 2 && s.ns == 3) run(forward_kernel<scalar_t, 4, 2, 3>);
    else if (s.nzl == 4 && s.nc == 1 && s.ns == 3) run(forward_kernel<scalar_t, 4, 1, 3>);
    else run(forward_kernel<scalar_t, 0, 0, 0>);
  });
  return out;
}

std::vector<torch::Tensor> mm_angular_backward(torch::Tensor gout, torch::Tensor a_ptr, torch::Tensor c_ptr,
                                               torch::Tensor arow, torch::Tensor ad, torch::Tensor cvec,
                                               torch::Tensor wq, torch::Tensor shifts, torch::Tensor zetas,
                                               torch::Tensor lams, torch::Tensor zint, double width, double cutoff,
                                               double qm_cutoff) {
  const int64_t nc = wq.size(1);
  auto gad = torch::zeros_like(ad), gcvec = torch::zeros_like(cvec), gwq = torch::zeros_like(wq);
  auto g = gout.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ad.scalar_type(), "mm_angular_backward", [&] {
    auto s = settings_of<scalar_t>(shifts, zetas, lams, zint, nc, width, cutoff, qm_cutoff);
    auto run = [&](auto kernel) {
      kernel(a_ptr.data_ptr<int64_t>(), c_ptr.data_ptr<int64_t>(), arow.data_ptr<int64_t>(), ad.data_ptr<scalar_t>(),
             cvec.data_ptr<scalar_t>(), wq.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gad.data_ptr<scalar_t>(),
             gcvec.data_ptr<scalar_t>(), gwq.data_ptr<scalar_t>(), a_ptr.numel() - 1, s);
    };
    if (s.nzl == 4 && s.nc == 2 && s.ns == 3) run(backward_kernel<scalar_t, 4, 2, 3>);
    else if (s.nzl == 4 && s.nc == 1 && s.ns == 3) run(backward_kernel<scalar_t, 4, 1, 3>);
    else run(backward_kernel<scalar_t, 0, 0, 0>);
  });
  return {gad, gcvec, gwq};
}

torch::Tensor qm_angular_forward(torch::Tensor a_ptr, torch::Tensor el, torch::Tensor pidx, int64_t n_ep,
                                 torch::Tensor ad, torch::Tensor shifts, torch::Tensor zetas, torch::Tensor lams,
                                 torch::Tensor zint, double width, double cutoff) {
  const int64_t n_centres = a_ptr.numel() - 1, n_el = pidx.size(0);
  auto out = torch::zeros({n_centres * n_ep, zetas.numel() * shifts.numel()}, ad.options());
  AT_DISPATCH_FLOATING_TYPES(ad.scalar_type(), "qm_angular_forward", [&] {
    auto s = settings_of<scalar_t>(shifts, zetas, lams, zint, 1, width, cutoff, cutoff);
    qm_forward_kernel<scalar_t>(a_ptr.data_ptr<int64_t>(), el.data_ptr<int64_t>(), pidx.data_ptr<int64_t>(), n_el,
                                n_ep, ad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n_centres, s);
  });
  return out;
}

torch::Tensor qm_angular_backward(torch::Tensor gout, torch::Tensor a_ptr, torch::Tensor el, torch::Tensor pidx,
                                  int64_t n_ep, torch::Tensor ad, torch::Tensor shifts, torch::Tensor zetas,
                                  torch::Tensor lams, torch::Tensor zint, double width, double cutoff) {
  const int64_t n_centres = a_ptr.numel() - 1, n_el = pidx.size(0);
  auto gad = torch::zeros_like(ad);
  auto g = gout.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ad.scalar_type(), "qm_angular_backward", [&] {
    auto s = settings_of<scalar_t>(shifts, zetas, lams, zint, 1, width, cutoff, cutoff);
    qm_backward_kernel<scalar_t>(a_ptr.data_ptr<int64_t>(), el.data_ptr<int64_t>(), pidx.data_ptr<int64_t>(), n_el,
                                 n_ep, ad.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gad.data_ptr<scalar_t>(),
                                 n_centres, s);
  });
  return gad;
}

torch::Tensor mm_radial_forward(torch::Tensor c_ptr, torch::Tensor r, torch::Tensor wq, torch::Tensor shifts,
                                double width, double cutoff) {
  const int64_t n_centres = c_ptr.numel() - 1, nc = wq.size(1);
  auto out = torch::zeros({n_centres, nc * shifts.numel()}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "mm_radial_forward", [&] {
    auto none = torch::empty({0}, r.options());
    auto s = settings_of<scalar_t>(shifts, none, none, torch::empty({0}, torch::kInt32), nc, width, cutoff, cutoff);
    mm_radial_forward_kernel<scalar_t>(c_ptr.data_ptr<int64_t>(), r.data_ptr<scalar_t>(), wq.data_ptr<scalar_t>(),
                                       out.data_ptr<scalar_t>(), n_centres, static_cast<int>(nc), s);
  });
  return out;
}

std::vector<torch::Tensor> mm_radial_backward(torch::Tensor gout, torch::Tensor c_ptr, torch::Tensor r,
                                              torch::Tensor wq, torch::Tensor shifts, double width, double cutoff) {
  const int64_t n_centres = c_ptr.numel() - 1, nc = wq.size(1);
  auto gr = torch::zeros_like(r), gwq = torch::zeros_like(wq);
  auto g = gout.contiguous();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "mm_radial_backward", [&] {
    auto none = torch::empty({0}, r.options());
    auto s = settings_of<scalar_t>(shifts, none, none, torch::empty({0}, torch::kInt32), nc, width, cutoff, cutoff);
    mm_radial_backward_kernel<scalar_t>(c_ptr.data_ptr<int64_t>(), r.data_ptr<scalar_t>(), wq.data_ptr<scalar_t>(),
                                        g.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), gwq.data_ptr<scalar_t>(),
                                        n_centres, static_cast<int>(nc), s);
  });
  return {gr, gwq};
}

std::vector<torch::Tensor> field_forward(torch::Tensor qptr, torch::Tensor mptr, torch::Tensor qpos,
                                         torch::Tensor mpos_t, torch::Tensor q) {
  const int64_t nq = qpos.size(0), n_frames = qptr.numel() - 1;
  auto phi = torch::zeros({nq}, qpos.options()), field = torch::zeros({nq, 3}, qpos.options());
  AT_DISPATCH_FLOATING_TYPES(qpos.scalar_type(), "field_forward", [&] {
    const scalar_t* m = mpos_t.data_ptr<scalar_t>();
    const int64_t nm = mpos_t.size(1);
    field_forward_kernel<scalar_t>(qptr.data_ptr<int64_t>(), mptr.data_ptr<int64_t>(), n_frames,
                                   qpos.data_ptr<scalar_t>(), m, m + nm, m + 2 * nm, q.data_ptr<scalar_t>(),
                                   phi.data_ptr<scalar_t>(), field.data_ptr<scalar_t>());
  });
  return {phi, field};
}

std::vector<torch::Tensor> field_backward(torch::Tensor gphi, torch::Tensor gfield, torch::Tensor qptr,
                                          torch::Tensor mptr, torch::Tensor qpos, torch::Tensor mpos_t,
                                          torch::Tensor q) {
  const int64_t n_frames = qptr.numel() - 1, nm = mpos_t.size(1);
  auto gqpos = torch::zeros_like(qpos), gmpos = torch::zeros({nm, 3}, qpos.options()), gq = torch::zeros_like(q);
  auto gp = gphi.contiguous(), gf = gfield.contiguous();
  AT_DISPATCH_FLOATING_TYPES(qpos.scalar_type(), "field_backward", [&] {
    const scalar_t* m = mpos_t.data_ptr<scalar_t>();
    field_backward_kernel<scalar_t>(qptr.data_ptr<int64_t>(), mptr.data_ptr<int64_t>(), n_frames,
                                    qpos.data_ptr<scalar_t>(), m, m + nm, m + 2 * nm, q.data_ptr<scalar_t>(),
                                    gp.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(), gqpos.data_ptr<scalar_t>(),
                                    gmpos.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>());
  });
  return {gqpos, gmpos, gq};
}

// All pairs (i, j), i of set a and j of set b in the same frame (atoms sorted by frame, CSR offsets per frame),
// with |r_i - r_j| < cutoff (the squares summed in torch's order; a pair within rounding of the cutoff may fall
// on either side, where every term's cutoff function is zero), skipping i == j when the sets are the same;
// sorted by i, within an i by j. Two passes over the pairs of each frame: counts per i, then the pairs.
template <typename T>
void pairs_within_kernel(const int64_t* aptr, const int64_t* bptr, int64_t n_frames, const T* apos, const T* bpos,
                         T cutoff, bool same, bool fill, int64_t* counts, const int64_t* start, int64_t* pi,
                         int64_t* pj) {
  for (int64_t f = 0; f < n_frames; ++f) {
    const int64_t b0 = bptr[f], b1 = bptr[f + 1];
    at::parallel_for(aptr[f], aptr[f + 1], 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T xi = apos[3 * i], yi = apos[3 * i + 1], zi = apos[3 * i + 2];
        int64_t n = 0, at = fill ? start[i] : 0;
        for (int64_t j = b0; j < b1; ++j) {
          const T dx = xi - bpos[3 * j], dy = yi - bpos[3 * j + 1], dz = zi - bpos[3 * j + 2];
          if (!(std::sqrt(dx * dx + dy * dy + dz * dz) < cutoff) || (same && i == j)) continue;
          if (fill) {
            pi[at] = i;
            pj[at++] = j;
          } else {
            ++n;
          }
        }
        if (!fill) counts[i] = n;
      }
    });
  }
}

std::vector<torch::Tensor> pairs_within(torch::Tensor aptr, torch::Tensor bptr, torch::Tensor apos,
                                        torch::Tensor bpos, double cutoff, bool same) {
  const int64_t na = apos.size(0), n_frames = aptr.numel() - 1;
  auto counts = torch::zeros({na}, aptr.options());
  torch::Tensor pi, pj;
  AT_DISPATCH_FLOATING_TYPES(apos.scalar_type(), "pairs_within", [&] {
    const scalar_t* a = apos.data_ptr<scalar_t>();
    const scalar_t* b = bpos.data_ptr<scalar_t>();
    const auto rc = static_cast<scalar_t>(cutoff);
    pairs_within_kernel<scalar_t>(aptr.data_ptr<int64_t>(), bptr.data_ptr<int64_t>(), n_frames, a, b, rc, same,
                                  false, counts.data_ptr<int64_t>(), nullptr, nullptr, nullptr);
    auto start = counts.cumsum(0) - counts;
    const int64_t total = na ? counts.sum().item<int64_t>() : 0;
    pi = torch::empty({total}, aptr.options());
    pj = torch::empty({total}, aptr.options());
    if (total > 0)  // (an empty tensor's data pointer may be null)
      pairs_within_kernel<scalar_t>(aptr.data_ptr<int64_t>(), bptr.data_ptr<int64_t>(), n_frames, a, b, rc, same,
                                    true, nullptr, start.data_ptr<int64_t>(), pi.data_ptr<int64_t>(),
                                    pj.data_ptr<int64_t>());
  });
  return {pi, pj};
}

// embedding.cpp
void nearest_qm_atoms(torch::Tensor positions, torch::Tensor mm, torch::Tensor centre, torch::Tensor box,
                      torch::Tensor inv_box, bool periodic, bool orthorhombic, torch::Tensor qm_rel, double cut2,
                      torch::Tensor dmin, torch::Tensor near, torch::Tensor image, torch::Tensor cand);

// dftb.cpp
std::vector<torch::Tensor> dftb_matrices_forward(torch::Tensor R, std::vector<torch::Tensor> idx,
                                                 std::vector<torch::Tensor> ab, std::vector<torch::Tensor> ba,
                                                 std::vector<torch::Tensor> rep, torch::Tensor onsite, double zeta,
                                                 double tail_len, bool third);
torch::Tensor dftb_matrices_backward(torch::Tensor R, torch::Tensor gH0, torch::Tensor gS, torch::Tensor ggam,
                                     torch::Tensor gG3, torch::Tensor gerep, std::vector<torch::Tensor> idx,
                                     std::vector<torch::Tensor> ab, std::vector<torch::Tensor> ba,
                                     std::vector<torch::Tensor> rep, torch::Tensor onsite, double zeta,
                                     double tail_len, bool third);
torch::Tensor dftb_potential_forward(torch::Tensor R, torch::Tensor Rm, torch::Tensor Q);
std::vector<torch::Tensor> dftb_potential_backward(torch::Tensor R, torch::Tensor Rm, torch::Tensor Q,
                                                   torch::Tensor gphi);

// the kernels release Python's lock: a delta model's baseline runs in a second Python thread beside them
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm_angular_forward", &mm_angular_forward, "MM angular term (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("mm_angular_backward", &mm_angular_backward, "its first derivatives (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("qm_angular_forward", &qm_angular_forward, "QM angular term (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("qm_angular_backward", &qm_angular_backward, "its first derivatives (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("mm_radial_forward", &mm_radial_forward, "MM radial term (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("mm_radial_backward", &mm_radial_backward, "its first derivatives (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("field_forward", &field_forward, "potential and field of the MM charges at the QM atoms (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("field_backward", &field_backward, "their first derivatives (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("dftb_matrices_forward", &dftb_matrices_forward, "DFTB's H0, S, gamma, Gamma, E_rep (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("dftb_matrices_backward", &dftb_matrices_backward, "their first derivatives (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("dftb_potential_forward", &dftb_potential_forward, "DFTB's point-charge potential at the QM atoms (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("dftb_potential_backward", &dftb_potential_backward, "its first derivatives (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("nearest_qm_atoms", &nearest_qm_atoms, "the embedding's nearest QM atom of every MM atom (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("pairs_within", &pairs_within, "pairs of atoms within a cutoff, frame by frame (CPU)", py::call_guard<py::gil_scoped_release>());
}
