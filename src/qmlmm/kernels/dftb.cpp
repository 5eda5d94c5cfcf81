// DFTB's geometry-dependent matrices and the point-charge potential on the CPU, with their first derivatives:
// the compiled form of qmlmm.engines.dftb.calculator.DFTBCalculator._matrices_torch and _potential_torch (the
// reference in tests/test_dftb_kernel.py), float64 only.
//
// For every atom pair p = (i, j) (i's element number <= j's, d = R_j - R_i, r = |d|, u = d / r), from the
// stacked tables of qmlmm.engines.dftb.tensors.PairTables:
//   - the 20 Slater-Koster integrals v(r) (10 Hamiltonian, 10 overlap; cubic spline inside r_max, DFTB+'s
//     tail (1 - t/L)^3 (a + b t + c t^2), t = min(r - r_max, L), beyond), of table A-B and, where a shell
//     l1 > l2 needs it, of table B-A;
//   - the blocks between shell l1 of i and l2 of j, (D^l1)^T V D^l2 (slater_koster.sk_blocks; D^l from the
//     rotation taking e_z to u, slater_koster.real_sh_rotations), written to H0 and S at (row, col) and
//     (col, row); on the diagonal the on-site energies and 1;
//   - gamma_ij = gamma_ji and the third-order Gamma_ij, Gamma_ji (gamma.charge_kernels), diagonal U and U^d/2;
//   - the repulsive energy (PairTables.repulsive), summed over pairs in pair order.
// The backward pass evaluates the same per-pair functions on dual numbers (value and derivatives with respect
// to d's three components: forward-mode differentiation, exact to rounding), contracts them with the
// incoming gradients of H0, S, gamma, Gamma and E_rep and adds each pair's result to R_j and subtracts it from
// R_i, in pair order. Every pair writes its own matrix entries, so pairs run in parallel with the same
// results on any thread count. Branches follow torch's forward (torch.where, clamp: no derivative through a
// clamped value, none through floor); there is no second derivative.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

// a value and its derivatives with respect to the pair vector d's three components
struct Dual {
  double v;
  double g[3];
  Dual(double x = 0.0) : v(x), g{0.0, 0.0, 0.0} {}  // NOLINT: constants convert implicitly
};
inline Dual operator+(Dual a, const Dual& b) {
  a.v += b.v;
  for (int k = 0; k < 3; ++k) a.g[k] += b.g[k];
  return a;
}
inline Dual operator-(Dual a, const Dual& b) {
  a.v -= b.v;
  for (int k = 0; k < 3; ++k) a.g[k] -= b.g[k];
  return a;
}
inline Dual operator-(Dual a) {
  a.v = -a.v;
  for (int k = 0; k < 3; ++k) a.g[k] = -a.g[k];
  return a;
}
inline Dual operator*(const Dual& a, const Dual& b) {
  Dual r(a.v * b.v);
  for (int k = 0; k < 3; ++k) r.g[k] = a.g[k] * b.v + a.v * b.g[k];
  return r;
}
inline Dual operator*(Dual a, double s) {
  a.v *= s;
  for (int k = 0; k < 3; ++k) a.g[k] *= s;
  return a;
}
inline Dual operator*(double s, Dual a) { return a * s; }
inline Dual operator/(const Dual& a, const Dual& b) {
  Dual r(a.v / b.v);
  for (int k = 0; k < 3; ++k) r.g[k] = (a.g[k] - r.v * b.g[k]) / b.v;
  return r;
}
inline Dual operator/(Dual a, double s) { return a * (1.0 / s); }
inline Dual operator/(double s, const Dual& b) {
  Dual r(s / b.v);
  for (int k = 0; k < 3; ++k) r.g[k] = -r.v * b.g[k] / b.v;
  return r;
}
inline Dual fexp(const Dual& a) {
  Dual r(std::exp(a.v));
  for (int k = 0; k < 3; ++k) r.g[k] = r.v * a.g[k];
  return r;
}
inline Dual fsqrt(const Dual& a) {
  Dual r(std::sqrt(a.v));
  for (int k = 0; k < 3; ++k) r.g[k] = a.g[k] * (0.5 / r.v);
  return r;
}
inline double fexp(double a) { return std::exp(a); }
inline double fsqrt(double a) { return std::sqrt(a); }
inline double value(double x) { return x; }
inline double value(const Dual& x) { return x.v; }

// one stacked table set (PairTables): spline coefficients (K, 4, 20), per pair its offset, grid step, last
// interval, r_max and tail coefficients (3, P, 20)
struct Tables {
  const double* coef;
  const int64_t* base;
  const double* dr;
  const int64_t* kmax;
  const double* rmax;
  const double* tail;
  int64_t n_pairs;
};

Tables tables_of(const std::vector<torch::Tensor>& t) {
  return {t[0].data_ptr<double>(), t[1].data_ptr<int64_t>(), t[2].data_ptr<double>(), t[3].data_ptr<int64_t>(),
          t[4].data_ptr<double>(), t[5].data_ptr<double>(), t[2].size(0)};
}

// the 20 integrals of table slot p at distance r (PairTables.integrals)
template <typename T>
void integrals(const Tables& t, int64_t p, const T& r, double tail_len, T* out) {
  const double rv = value(r);
  if (rv <= t.rmax[p]) {
    int64_t k = static_cast<int64_t>(std::floor(rv / t.dr[p])) - 1;
    k = std::min(std::max<int64_t>(k, 0), t.kmax[p]);
    const T x = r - static_cast<double>(k + 1) * t.dr[p];
    const double* c = t.coef + (t.base[p] + k) * 80;
    for (int col = 0; col < 20; ++col) out[col] = ((c[col] * x + c[20 + col]) * x + c[40 + col]) * x + c[60 + col];
    return;
  }
  T tt = r - t.rmax[p];
  if (value(tt) > tail_len) tt = T(tail_len);  // clamp: no derivative through the clamped value
  const T w = 1.0 - tt / tail_len;
  const T w3 = w * w * w;
  const double* a = t.tail + p * 20;
  const double* b = t.tail + (t.n_pairs + p) * 20;
  const double* c = t.tail + (2 * t.n_pairs + p) * 20;
  for (int col = 0; col < 20; ++col) out[col] = w3 * (a[col] + tt * (b[col] + c[col] * tt));
}

// repulsive splines (PairTables.repulsive): knots (P, K) padded with +inf, coefficients (., 6), exp (3, P)
struct Repulsive {
  const double* knots;
  int64_t n_knots;
  const int64_t* kmax;
  const double* coef;
  const int64_t* base;
  const double* expo;
  const double* cutoff;
  int64_t n_pairs;
};

template <typename T>
T repulsive(const Repulsive& t, int64_t p, const T& r) {
  const double rv = value(r);
  if (!(rv < t.cutoff[p])) return T(0.0);
  const double* kn = t.knots + p * t.n_knots;
  if (rv < kn[0]) return fexp(-t.expo[p] * r + t.expo[t.n_pairs + p]) + t.expo[2 * t.n_pairs + p];
  int64_t count = 0;
  for (int64_t j = 0; j < t.n_knots; ++j) count += rv >= kn[j];
  const int64_t k = std::min(std::max<int64_t>(count - 1, 0), t.kmax[p]);
  const T x = r - kn[k];
  const double* c = t.coef + (t.base[p] + k) * 6;
  T poly = T(c[5]);
  for (int i = 4; i >= 0; --i) poly = poly * x + c[i];
  return poly;
}

// gamma.py's _unequal_part: f(a, b) and its derivatives df/da, df/db at distance r
template <typename T>
void unequal_part(const T& r, double a, double b, T& f, T& fa, T& fb) {
  const double D = a * a - b * b, b2 = b * b, b4 = b2 * b2;
  const double num = b4 * b2 - 3.0 * b4 * a * a;
  const double D2 = D * D, D3 = D2 * D, D4 = D2 * D2;
  const T e = fexp(-a * r);
  f = e * (b4 * a / (2.0 * D2) - num / (D3 * r));
  const double g1a = 0.5 * b4 * (1.0 / D2 - 4.0 * a * a / D3);
  const T g2a = (-6.0 * b4 * a / D3 - 6.0 * a * num / D4) / r;
  const double g1b = 2.0 * a * b2 * b / D2 + 2.0 * a * b4 * b / D3;
  const T g2b = ((6.0 * b4 * b - 12.0 * b2 * b * a * a) / D3 + 6.0 * b * num / D4) / r;
  fa = e * (g1a - g2a) - r * f;
  fb = e * (g1b - g2b);
}

constexpr double kEqualU = 0.3125e-5;  // gamma.EQUAL_U

// gamma.charge_kernels: gamma_ij and (third order) Gamma_ij, Gamma_ji
template <typename T>
void charge_kernels(const T& r, double ua, double ub, double uda, double udb, bool hpair, double zeta, bool third,
                    T& g, T& g_ij, T& g_ji) {
  const bool equal = std::abs(ua - ub) < kEqualU;
  const double ta = 3.2 * ua, tb = 3.2 * ub, t = 0.5 * (ta + tb);
  T S, dsa, dsb;
  if (equal) {
    const T et = fexp(-t * r);
    S = et * (1.0 / r + 11.0 / 16.0 * t + 3.0 / 16.0 * t * t * r + t * t * t * r * r / 48.0);
    if (third) {
      dsa = 3.2 * (-r * S + et * (11.0 / 16.0 + 3.0 / 8.0 * t * r + t * t * r * r / 16.0));
      dsb = dsa;
    }
  } else {
    T f_ab, fa_ab, fb_ab, f_ba, fa_ba, fb_ba;
    unequal_part(r, ta, tb, f_ab, fa_ab, fb_ab);
    unequal_part(r, tb, ta, f_ba, fa_ba, fb_ba);
    S = f_ab + f_ba;
    if (third) {
      dsa = 3.2 * (fa_ab + fb_ba);
      dsb = 3.2 * (fb_ab + fa_ba);
    }
  }
  T h = T(1.0), dh = T(0.0);
  if (hpair) {  // only set where the parameters have a zeta
    const double u = 0.5 * (ua + ub);
    h = fexp(-std::pow(u, zeta) * r * r);
    dh = -0.5 * zeta * std::pow(u, zeta - 1.0) * r * r * h;
  }
  g = 1.0 / r - S * h;
  if (third) {
    g_ij = uda * (-dsa * h - S * dh);
    g_ji = udb * (-dsb * h - S * dh);
  }
}

// slater_koster._d_basis: Y_2k(r) = r^T M_k r
const double kS3 = 1.0 / (2.0 * std::sqrt(3.0));
const double kM[5][3][3] = {
    {{0, 0.5, 0}, {0.5, 0, 0}, {0, 0, 0}},
    {{0, 0, 0}, {0, 0, 0.5}, {0, 0.5, 0}},
    {{-kS3, 0, 0}, {0, -kS3, 0}, {0, 0, 2 * kS3}},
    {{0, 0, 0.5}, {0, 0, 0}, {0.5, 0, 0}},
    {{0.5, 0, 0}, {0, -0.5, 0}, {0, 0, 0}},
};

// D^1 (3, 3) and, if lmax == 2, D^2 (5, 5) for the unit vector u (slater_koster.real_sh_rotations)
template <typename T>
void rotations(const T* u, int lmax, T D1[3][3], T D2[5][5]) {
  T e1[3], e2[3];
  if (std::abs(value(u[2])) < 0.9) {  // helper e_z: e1 = e_z x u
    e1[0] = -u[1];
    e1[1] = u[0];
    e1[2] = T(0.0);
  } else {  // helper e_x: e1 = e_x x u
    e1[0] = T(0.0);
    e1[1] = -u[2];
    e1[2] = u[1];
  }
  const T n = fsqrt(e1[0] * e1[0] + e1[1] * e1[1] + e1[2] * e1[2]);
  for (int k = 0; k < 3; ++k) e1[k] = e1[k] / n;
  e2[0] = u[1] * e1[2] - u[2] * e1[1];
  e2[1] = u[2] * e1[0] - u[0] * e1[2];
  e2[2] = u[0] * e1[1] - u[1] * e1[0];
  const T* col[3] = {e1, e2, u};  // R = [e1 e2 u] by columns, R[i][c] = col[c][i]
  const int perm[3] = {1, 2, 0};
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b) D1[a][b] = col[perm[a]][perm[b]];
  if (lmax < 2) return;
  for (int k = 0; k < 5; ++k) {
    T rmr[3][3];  // R M_k R^T
    for (int i = 0; i < 3; ++i)
      for (int m = 0; m < 3; ++m) {
        T s = T(0.0);
        for (int j = 0; j < 3; ++j)
          for (int l = 0; l < 3; ++l)
            if (kM[k][j][l] != 0.0) s = s + col[j][i] * (kM[k][j][l] * col[l][m]);
        rmr[i][m] = s;
      }
    for (int a = 0; a < 5; ++a) {
      T s = T(0.0);
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
          if (kM[a][i][j] != 0.0) s = s + rmr[i][j] * kM[a][i][j];
      D2[k][a] = 2.0 * s;
    }
  }
}

// skf.COLUMN: (l1 <= l2, |m|) -> column of the Hamiltonian integrals (overlap: + 10)
inline int column(int l1, int l2, int m) {
  static const int c[3][3][3] = {{{9, -1, -1}, {8, -1, -1}, {7, -1, -1}},
                                 {{-1, -1, -1}, {5, 6, -1}, {3, 4, -1}},
                                 {{-1, -1, -1}, {-1, -1, -1}, {0, 1, 2}}};
  return c[l1][l2][m];
}

// everything a pair needs: atoms, orbital offsets and shells, table slots, kernel constants
struct Pairs {
  const int64_t *pi, *pj, *off, *lmax, *ba_slot;
  const double *U, *Ud;
  const bool* hpair;
  Tables ab, ba;
  Repulsive rep;
  double zeta, tail_len;
  bool third;
  int64_t n_pairs;
};

// the visitor receives (row, col, h, s) for every block entry, then (g, g_ij, g_ji, e_rep)
template <typename T, typename Entry>
void pair_terms(const Pairs& q, int64_t p, const T* d, Entry&& entry, T& g, T& g_ij, T& g_ji, T& e_rep) {
  const int64_t i = q.pi[p], j = q.pj[p];
  const T r = fsqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
  const T u[3] = {d[0] / r, d[1] / r, d[2] / r};
  const int li = static_cast<int>(q.lmax[i]), lj = static_cast<int>(q.lmax[j]);
  T vab[20], vba_own[20];
  integrals(q.ab, p, r, q.tail_len, vab);
  const T* vba = vab;
  if (q.ba_slot[p] >= 0) {
    integrals(q.ba, q.ba_slot[p], r, q.tail_len, vba_own);
    vba = vba_own;
  }
  T D1[3][3], D2[5][5];
  const int lm = std::max(li, lj);
  if (lm > 0) rotations(u, lm, D1, D2);
  auto D = [&](int l, int a, int b) -> T { return l == 0 ? T(1.0) : (l == 1 ? D1[a][b] : D2[a][b]); };
  for (int l1 = 0; l1 <= li; ++l1)
    for (int l2 = 0; l2 <= lj; ++l2) {
      const int lo = std::min(l1, l2);
      const T* v = l1 <= l2 ? vab : vba;
      const double sign = (l1 <= l2 || (l1 + l2) % 2 == 0) ? 1.0 : -1.0;
      T V[2][5];
      for (int m = -lo; m <= lo; ++m) {
        const int c = l1 <= l2 ? column(l1, l2, std::abs(m)) : column(l2, l1, std::abs(m));
        V[0][m + lo] = sign * v[c];
        V[1][m + lo] = sign * v[c + 10];
      }
      for (int a = 0; a < 2 * l1 + 1; ++a)
        for (int b = 0; b < 2 * l2 + 1; ++b) {
          T h = T(0.0), s = T(0.0);
          for (int m = -lo; m <= lo; ++m) {
            const T ab = D(l1, m + l1, a) * D(l2, m + l2, b);
            h = h + ab * V[0][m + lo];
            s = s + ab * V[1][m + lo];
          }
          entry(q.off[i] + l1 * l1 + a, q.off[j] + l2 * l2 + b, h, s);
        }
    }
  charge_kernels(r, q.U[i], q.U[j], q.Ud[i], q.Ud[j], q.hpair[p], q.zeta, q.third, g, g_ij, g_ji);
  e_rep = repulsive(q.rep, p, r);
}

Pairs pairs_of(const std::vector<torch::Tensor>& idx, const std::vector<torch::Tensor>& ab,
               const std::vector<torch::Tensor>& ba, const std::vector<torch::Tensor>& rep, double zeta,
               double tail_len, bool third) {
  Pairs q;
  q.pi = idx[0].data_ptr<int64_t>();
  q.pj = idx[1].data_ptr<int64_t>();
  q.off = idx[2].data_ptr<int64_t>();
  q.lmax = idx[3].data_ptr<int64_t>();
  q.ba_slot = idx[4].data_ptr<int64_t>();
  q.hpair = idx[5].data_ptr<bool>();
  q.U = idx[6].data_ptr<double>();
  q.Ud = idx[7].data_ptr<double>();
  q.n_pairs = idx[0].size(0);
  q.ab = tables_of(ab);
  q.ba = ba[2].size(0) > 0 ? tables_of(ba) : q.ab;
  q.rep = {rep[0].data_ptr<double>(), rep[0].size(1), rep[1].data_ptr<int64_t>(), rep[2].data_ptr<double>(),
           rep[3].data_ptr<int64_t>(), rep[4].data_ptr<double>(), rep[5].data_ptr<double>(), rep[0].size(0)};
  q.zeta = zeta;
  q.tail_len = tail_len;
  q.third = third;
  return q;
}

constexpr int64_t kGrain = 32;

// refuse what would read or write outside the buffers: CPU float64 tensors of the stated shapes
void check_double(const torch::Tensor& t, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kDouble, name, " must be a CPU float64 tensor");
  TORCH_CHECK(t.sizes() == torch::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ",
              torch::IntArrayRef(shape));
}

void check_pairs(const torch::Tensor& R, const std::vector<torch::Tensor>& idx, const std::vector<torch::Tensor>& ab,
                 const std::vector<torch::Tensor>& ba, const std::vector<torch::Tensor>& rep,
                 const torch::Tensor& onsite) {
  TORCH_CHECK(R.dim() == 3 && R.size(2) == 3, "positions must have shape (B, n, 3)");
  check_double(R, {R.size(0), R.size(1), 3}, "positions");
  TORCH_CHECK(idx.size() == 8 && ab.size() == 6 && ba.size() == 6 && rep.size() == 6, "wrong argument lists");
  const int64_t n = idx[2].size(0), P = idx[0].size(0);
  TORCH_CHECK(R.size(1) == n, "positions have ", R.size(1), " atoms, the molecule ", n);
  for (int k = 0; k < 8; ++k)
    TORCH_CHECK(idx[k].device().is_cpu() && idx[k].is_contiguous(), "idx must be CPU, contiguous");
  for (int k : {1, 4, 5}) TORCH_CHECK(idx[k].size(0) == P, "pair arrays differ in length");
  for (int k : {3, 6, 7}) TORCH_CHECK(idx[k].size(0) == n, "atom arrays differ in length");
  TORCH_CHECK(ab[2].size(0) == P && rep[0].size(0) == P, "tables do not match the pairs");
  for (const auto* list : {&ab, &ba, &rep})
    for (const auto& t : *list)
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "tables must be CPU, contiguous");
  TORCH_CHECK(onsite.device().is_cpu() && onsite.is_contiguous() && onsite.dim() == 1,
              "onsite must be (N,) on the CPU");
}

}  // namespace

// H0, S (B, N, N), gamma, Gamma (B, n, n; Gamma empty without third order) and E_rep (B,) for positions R
// (B, n, 3) Bohr. idx: pi, pj (P,), orbital offsets (n,), lmax (n,), B-A table slot per pair (P,; -1: use the
// A-B table), hpair (P,) bool, U, U^d (n,); ab, ba: PairTables (coef, base, dr, k_max, r_max, tail);
// rep: knots, k_max, coef, base, exp, cutoff; onsite (N,).
std::vector<torch::Tensor> dftb_matrices_forward(torch::Tensor R, std::vector<torch::Tensor> idx,
                                                 std::vector<torch::Tensor> ab, std::vector<torch::Tensor> ba,
                                                 std::vector<torch::Tensor> rep, torch::Tensor onsite, double zeta,
                                                 double tail_len, bool third) {
  check_pairs(R, idx, ab, ba, rep, onsite);
  R = R.contiguous();
  const int64_t B = R.size(0), n = R.size(1), N = onsite.size(0);
  const Pairs q = pairs_of(idx, ab, ba, rep, zeta, tail_len, third);
  const int64_t P = q.n_pairs;
  auto opts = R.options();
  auto H0 = torch::zeros({B, N, N}, opts), S = torch::zeros({B, N, N}, opts);
  auto gam = torch::zeros({B, n, n}, opts);
  auto G3 = third ? torch::zeros({B, n, n}, opts) : torch::zeros({0}, opts);
  auto erep_pairs = torch::zeros({B, std::max<int64_t>(P, 1)}, opts);
  const double* pos = R.data_ptr<double>();
  const double* eps = onsite.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double* h0 = H0.data_ptr<double>() + b * N * N;
    double* s0 = S.data_ptr<double>() + b * N * N;
    double* gm = gam.data_ptr<double>() + b * n * n;
    double* g3 = third ? G3.data_ptr<double>() + b * n * n : nullptr;
    double* er = erep_pairs.data_ptr<double>() + b * std::max<int64_t>(P, 1);
    const double* x = pos + b * n * 3;
    for (int64_t k = 0; k < N; ++k) {
      h0[k * N + k] = eps[k];
      s0[k * N + k] = 1.0;
    }
    for (int64_t a = 0; a < n; ++a) {
      gm[a * n + a] = q.U[a];
      if (third) g3[a * n + a] = 0.5 * q.Ud[a];
    }
    at::parallel_for(0, P, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t i = q.pi[p], j = q.pj[p];
        const double d[3] = {x[j * 3] - x[i * 3], x[j * 3 + 1] - x[i * 3 + 1], x[j * 3 + 2] - x[i * 3 + 2]};
        double g = 0, gij = 0, gji = 0, e = 0;
        pair_terms<double>(
            q, p, d,
            [&](int64_t row, int64_t col, double h, double s) {
              h0[row * N + col] = h0[col * N + row] = h;
              s0[row * N + col] = s0[col * N + row] = s;
            },
            g, gij, gji, e);
        gm[i * n + j] = gm[j * n + i] = g;
        if (third) {
          g3[i * n + j] = gij;
          g3[j * n + i] = gji;
        }
        er[p] = e;
      }
    });
  }
  auto erep = P > 0 ? erep_pairs.sum(1) : torch::zeros({B}, opts);
  return {H0, S, gam, G3, erep};
}

// dL/dR (B, n, 3) from the gradients of L with respect to dftb_matrices_forward's outputs (same arguments)
torch::Tensor dftb_matrices_backward(torch::Tensor R, torch::Tensor gH0, torch::Tensor gS, torch::Tensor ggam,
                                     torch::Tensor gG3, torch::Tensor gerep, std::vector<torch::Tensor> idx,
                                     std::vector<torch::Tensor> ab, std::vector<torch::Tensor> ba,
                                     std::vector<torch::Tensor> rep, torch::Tensor onsite, double zeta,
                                     double tail_len, bool third) {
  check_pairs(R, idx, ab, ba, rep, onsite);
  {
    const int64_t B = R.size(0), n = R.size(1), N = onsite.size(0);
    check_double(gH0, {B, N, N}, "dL/dH0");
    check_double(gS, {B, N, N}, "dL/dS");
    check_double(ggam, {B, n, n}, "dL/dgamma");
    if (third) check_double(gG3, {B, n, n}, "dL/dGamma");
    check_double(gerep, {B}, "dL/dE_rep");
  }
  R = R.contiguous();
  gH0 = gH0.contiguous();
  gS = gS.contiguous();
  ggam = ggam.contiguous();
  gerep = gerep.contiguous();
  if (third) gG3 = gG3.contiguous();
  const int64_t B = R.size(0), n = R.size(1), N = onsite.size(0);
  const Pairs q = pairs_of(idx, ab, ba, rep, zeta, tail_len, third);
  const int64_t P = q.n_pairs;
  auto gR = torch::zeros_like(R);
  std::vector<double> gd(3 * std::max<int64_t>(P, 1));
  const double* pos = R.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    const double* h0 = gH0.data_ptr<double>() + b * N * N;
    const double* s0 = gS.data_ptr<double>() + b * N * N;
    const double* gm = ggam.data_ptr<double>() + b * n * n;
    const double* g3 = third ? gG3.data_ptr<double>() + b * n * n : nullptr;
    const double ge = gerep.data_ptr<double>()[b];
    const double* x = pos + b * n * 3;
    at::parallel_for(0, P, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t i = q.pi[p], j = q.pj[p];
        Dual d[3];
        for (int k = 0; k < 3; ++k) {
          d[k] = Dual(x[j * 3 + k] - x[i * 3 + k]);
          d[k].g[k] = 1.0;
        }
        double acc[3] = {0.0, 0.0, 0.0};
        Dual g, gij, gji, e;
        pair_terms<Dual>(
            q, p, d,
            [&](int64_t row, int64_t col, const Dual& h, const Dual& s) {
              const double wh = h0[row * N + col] + h0[col * N + row];
              const double ws = s0[row * N + col] + s0[col * N + row];
              for (int k = 0; k < 3; ++k) acc[k] += wh * h.g[k] + ws * s.g[k];
            },
            g, gij, gji, e);
        const double wg = gm[i * n + j] + gm[j * n + i];
        for (int k = 0; k < 3; ++k) {
          acc[k] += wg * g.g[k] + ge * e.g[k];
          if (third) acc[k] += g3[i * n + j] * gij.g[k] + g3[j * n + i] * gji.g[k];
          gd[3 * p + k] = acc[k];
        }
      }
    });
    double* out = gR.data_ptr<double>() + b * n * 3;
    for (int64_t p = 0; p < P; ++p)  // d = R_j - R_i
      for (int k = 0; k < 3; ++k) {
        out[q.pj[p] * 3 + k] += gd[3 * p + k];
        out[q.pi[p] * 3 + k] -= gd[3 * p + k];
      }
  }
  return gR;
}

// phi (B, n): phi_A = sum_J Q_J / |R_A - R_J| for QM positions R (B, n, 3) and charges Q (B, m) at Rm (B, m, 3)
// R (B, n, 3), Rm (B, m, 3), Q (B, m): CPU float64
static void check_potential(const torch::Tensor& R, const torch::Tensor& Rm, const torch::Tensor& Q) {
  TORCH_CHECK(R.dim() == 3 && R.size(2) == 3 && Rm.dim() == 3 && Rm.size(2) == 3 && Q.dim() == 2,
              "positions must be (B, n, 3) and (B, m, 3), charges (B, m)");
  check_double(R, {R.size(0), R.size(1), 3}, "QM positions");
  check_double(Rm, {R.size(0), Rm.size(1), 3}, "charge positions");
  check_double(Q, {R.size(0), Rm.size(1)}, "charges");
}

torch::Tensor dftb_potential_forward(torch::Tensor R, torch::Tensor Rm, torch::Tensor Q) {
  check_potential(R, Rm, Q);
  R = R.contiguous();
  Rm = Rm.contiguous();
  Q = Q.contiguous();
  const int64_t B = R.size(0), n = R.size(1), m = Rm.size(1);
  auto phi = torch::zeros({B, n}, R.options());
  const double *x = R.data_ptr<double>(), *y = Rm.data_ptr<double>(), *c = Q.data_ptr<double>();
  double* out = phi.data_ptr<double>();
  at::parallel_for(0, B * n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / n;
      const double* a = x + t * 3;
      const double* yb = y + b * m * 3;
      const double* cb = c + b * m;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t J = 0; J < m; ++J) {
        const double dx = a[0] - yb[J * 3], dy = a[1] - yb[J * 3 + 1], dz = a[2] - yb[J * 3 + 2];
        s += cb[J] / std::sqrt(dx * dx + dy * dy + dz * dz);
      }
      out[t] = s;
    }
  });
  return phi;
}

// the gradients of L with respect to R, Rm and Q from gphi = dL/dphi (B, n): [gR, gRm, gQ]
std::vector<torch::Tensor> dftb_potential_backward(torch::Tensor R, torch::Tensor Rm, torch::Tensor Q,
                                                   torch::Tensor gphi) {
  check_potential(R, Rm, Q);
  check_double(gphi, {R.size(0), R.size(1)}, "dL/dphi");
  R = R.contiguous();
  Rm = Rm.contiguous();
  Q = Q.contiguous();
  gphi = gphi.contiguous();
  const int64_t B = R.size(0), n = R.size(1), m = Rm.size(1);
  auto gR = torch::zeros_like(R), gRm = torch::zeros_like(Rm), gQ = torch::zeros_like(Q);
  const double *x = R.data_ptr<double>(), *y = Rm.data_ptr<double>(), *c = Q.data_ptr<double>();
  const double* w = gphi.data_ptr<double>();
  double *oR = gR.data_ptr<double>(), *oM = gRm.data_ptr<double>(), *oQ = gQ.data_ptr<double>();
  // QM atoms: d/dR_A (Q_J / r) = -Q_J (R_A - R_J) / r^3
  at::parallel_for(0, B * n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / n;
      const double* a = x + t * 3;
      const double* yb = y + b * m * 3;
      const double* cb = c + b * m;
      double s0 = 0.0, s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2)
      for (int64_t J = 0; J < m; ++J) {
        const double dx = a[0] - yb[J * 3], dy = a[1] - yb[J * 3 + 1], dz = a[2] - yb[J * 3 + 2];
        const double inv = 1.0 / std::sqrt(dx * dx + dy * dy + dz * dz);
        const double f = cb[J] * inv * inv * inv;
        s0 -= f * dx;
        s1 -= f * dy;
        s2 -= f * dz;
      }
      oR[t * 3] = w[t] * s0;
      oR[t * 3 + 1] = w[t] * s1;
      oR[t * 3 + 2] = w[t] * s2;
    }
  });
  // charges: d/dR_J = +Q_J (R_A - R_J) / r^3 w_A, d/dQ_J = w_A / r
  at::parallel_for(0, B * m, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / m;
      const double* yJ = y + t * 3;
      const double* xb = x + b * n * 3;
      const double* wb = w + b * n;
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, sq = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, sq)
      for (int64_t A = 0; A < n; ++A) {
        const double dx = xb[A * 3] - yJ[0], dy = xb[A * 3 + 1] - yJ[1], dz = xb[A * 3 + 2] - yJ[2];
        const double inv = 1.0 / std::sqrt(dx * dx + dy * dy + dz * dz);
        const double f = wb[A] * inv * inv * inv;
        s0 += f * dx;
        s1 += f * dy;
        s2 += f * dz;
        sq += wb[A] * inv;
      }
      oM[t * 3] = c[t] * s0;
      oM[t * 3 + 1] = c[t] * s1;
      oM[t * 3 + 2] = c[t] * s2;
      oQ[t] = sq;
    }
  });
  return {gR, gRm, gQ};
}
