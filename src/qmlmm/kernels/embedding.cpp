// The embedding's search for the QM atom nearest to every MM atom (qmlmm.environment._nearest_qm_atoms, its
// centre-image path), in one pass over the MM atoms instead of numpy's several passes over (M, 3) and
// (candidates, n_qm) arrays (it runs every MD step, after OpenMM's step has left the caches cold).
//
// For MM atom m (position x = positions[mm[m]]), p = x - c (c the QM centre) at its minimum image: per axis
// p - L round(p / L) in an orthorhombic box, else f = p B^-1, f - round(f), back by B (box rows B), as
// qmlmm.system.minimum_image computes it (round half to even, as numpy). If |p|^2 < cut2 the atom is a
// candidate: dmin[m] = min_i |p - q_i| over the QM atoms q_i (positions from c), near[m] the first i at
// that minimum, image[m] = p + c. Other atoms are left as the caller filled them. Each atom belongs to one
// thread: the same results on any thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <vector>

namespace {

// the smallest of v[0..n-1] (n >= 1; no NaN), over four independent running minima
double smallest(const double* v, int64_t n) {
  double b[4] = {v[0], v[0], v[0], v[0]};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) b[k] = v[i + k] < b[k] ? v[i + k] : b[k];
  for (; i < n; ++i) b[0] = v[i] < b[0] ? v[i] : b[0];
  return std::min(std::min(b[0], b[1]), std::min(b[2], b[3]));
}

}  // namespace

void nearest_qm_atoms(torch::Tensor positions, torch::Tensor mm, torch::Tensor centre, torch::Tensor box,
                      torch::Tensor inv_box, bool periodic, bool orthorhombic, torch::Tensor qm_rel, double cut2,
                      torch::Tensor dmin, torch::Tensor near, torch::Tensor image, torch::Tensor cand) {
  TORCH_CHECK(positions.scalar_type() == torch::kFloat64 && positions.is_contiguous(), "positions: float64 (N, 3)");
  TORCH_CHECK(mm.scalar_type() == torch::kInt64 && mm.is_contiguous(), "mm: contiguous int64");
  for (const auto& t : {centre, box, inv_box, qm_rel, dmin, image})
    TORCH_CHECK(t.scalar_type() == torch::kFloat64 && t.is_contiguous(), "nearest_qm_atoms: contiguous float64 arrays");
  TORCH_CHECK(near.scalar_type() == torch::kInt64 && near.is_contiguous(), "near: contiguous int64");
  TORCH_CHECK(cand.scalar_type() == torch::kUInt8 && cand.is_contiguous(), "cand: contiguous uint8");
  TORCH_CHECK(dmin.numel() == mm.numel() && near.numel() == mm.numel() && image.numel() == 3 * mm.numel() &&
                  cand.numel() == mm.numel(),
              "nearest_qm_atoms: output sizes must match the MM atoms");
  const double* x = positions.data_ptr<double>();
  const int64_t* idx = mm.data_ptr<int64_t>();
  const double* c = centre.data_ptr<double>();
  const double* B = box.data_ptr<double>();
  const double* Bi = inv_box.data_ptr<double>();
  const double* q = qm_rel.data_ptr<double>();
  const int64_t n_mm = mm.numel(), n_qm = qm_rel.size(0);
  TORCH_CHECK(n_qm > 0, "nearest_qm_atoms: no QM atom");
  double* dm = dmin.data_ptr<double>();
  int64_t* nr = near.data_ptr<int64_t>();
  double* im = image.data_ptr<double>();
  uint8_t* cd = cand.data_ptr<uint8_t>();
  // the QM coordinates as three arrays, and the squared distances of one atom to all of them in a buffer: the
  // distance loop then vectorises, and the minimum is a separate scan (one loop with a running minimum and its
  // index was ~4 ns per pair; retinoic acid in water has ~3300 candidates x 50 QM atoms)
  std::vector<double> qx(n_qm), qy(n_qm), qz(n_qm);
  for (int64_t i = 0; i < n_qm; ++i) {
    qx[i] = q[3 * i];
    qy[i] = q[3 * i + 1];
    qz[i] = q[3 * i + 2];
  }
  at::parallel_for(0, n_mm, 512, [&](int64_t m0, int64_t m1) {
    std::vector<double> r2(n_qm);
    for (int64_t m = m0; m < m1; ++m) {
      const double* xa = x + 3 * idx[m];
      double p[3] = {xa[0] - c[0], xa[1] - c[1], xa[2] - c[2]};
      if (periodic && orthorhombic) {
        for (int k = 0; k < 3; ++k) p[k] = p[k] - B[4 * k] * std::nearbyint(p[k] / B[4 * k]);
      } else if (periodic) {
        double f[3];
        for (int k = 0; k < 3; ++k) f[k] = p[0] * Bi[k] + p[1] * Bi[3 + k] + p[2] * Bi[6 + k];
        for (int k = 0; k < 3; ++k) f[k] -= std::nearbyint(f[k]);
        for (int k = 0; k < 3; ++k) p[k] = f[0] * B[k] + f[1] * B[3 + k] + f[2] * B[6 + k];
      }
      if (!(p[0] * p[0] + p[1] * p[1] + p[2] * p[2] < cut2)) {
        cd[m] = 0;
        continue;
      }
      for (int64_t i = 0; i < n_qm; ++i) {
        const double dx = p[0] - qx[i], dy = p[1] - qy[i], dz = p[2] - qz[i];
        r2[i] = dx * dx + dy * dy + dz * dz;
      }
      const double best = smallest(r2.data(), n_qm);
      int64_t at = 0;
      while (at < n_qm - 1 && !(r2[at] == best)) ++at;  // the first QM atom at the minimum
      cd[m] = 1;
      dm[m] = std::sqrt(best);
      nr[m] = at;
      for (int k = 0; k < 3; ++k) im[3 * m + k] = p[k] + c[k];
    }
  });
}
