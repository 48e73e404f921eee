// ROAD's linear imputation solve on CPU: the fused counterpart of the torch solver in
// masked_ops/explain/imputation.py (same linear system, same tolerance rule; see its docstring).
//
// Per image and channel (one independent system each, run in parallel): conjugate gradients on
// (D - W) u = b over the removed pixels R, preconditioned by a geometric multigrid V-cycle. Why a
// kernel: the torch solver spends one eager pass per stencil term and per vector update (~40 per
// iteration, each re-reading the whole batch); here a stencil, a Jacobi sweep or a residual with
// its restriction is one loop over a zero-bordered buffer, so a V-cycle costs a few passes.
//
// Grids: level 0 is the image; a coarse cell covers 2 x 2 cells of the finer level and is an
// unknown only if all four are (cells that touch a visible pixel, or the image border of an odd
// side, hold a zero correction, as a Dirichlet boundary). Every level uses the same normalised
// 8-neighbour stencil (1/6 edge, 1/12 diagonal, D = the in-grid weight sum). Prolongation is
// piecewise constant, restriction its transpose (a 2 x 2 sum); the coarse correction is damped by
// kCoarseWeight (piecewise-constant transfer with a re-discretised coarse operator over-corrects:
// its Galerkin operator has a 2.3x larger diagonal), and kSweeps Jacobi sweeps run before and after
// it, so the preconditioner is a fixed symmetric positive definite operator and CG stays CG. The
// coarsest grid (at most kCoarsest cells a side) is solved exactly by a dense Cholesky factor.
#include <torch/library.h>

#include "common.h"

#include <vector>

namespace masked_ops {
namespace cpu {
namespace {

constexpr double kEdge = 1.0 / 6.0, kDiag = 1.0 / 12.0;
constexpr int64_t kCoarsest = 8;
constexpr int kSweeps = 2;
constexpr double kCoarseWeight = 0.9;

// One grid, stored with a one-cell zero border so that the stencil needs no bounds checks.
struct Grid {
  int64_t h = 0, w = 0, stride = 0;
  std::vector<double> r, d_r, inv_d_r;  // 1 on the unknowns; D there; 1 / D there (all 0 elsewhere)
  std::vector<double> rhs, e, tmp;      // the V-cycle's right-hand side, correction, scratch
  std::vector<int64_t> unknowns;        // coarsest grid only: the cells of the dense system
  std::vector<double> chol;             // coarsest grid only: its Cholesky factor (row-major, lower)

  Grid(int64_t h_, int64_t w_) : h(h_), w(w_), stride(w_ + 2) {
    const size_t n = static_cast<size_t>((h + 2) * stride);
    r.assign(n, 0.0);
    d_r.assign(n, 0.0);
    inv_d_r.assign(n, 0.0);
    rhs.assign(n, 0.0);
    e.assign(n, 0.0);
    tmp.assign(n, 0.0);
  }
  int64_t at(int64_t y, int64_t x) const { return (y + 1) * stride + x + 1; }
  size_t size() const { return r.size(); }

  // Marks the unknowns and sets D: the weights of the 8 neighbours that lie inside the grid.
  void set_unknowns(const std::vector<uint8_t>& removed) {
    for (int64_t y = 0; y < h; ++y) {
      const double wy = (y > 0 ? 1.0 : 0.0) + (y + 1 < h ? 1.0 : 0.0);  // rows above/below
      for (int64_t x = 0; x < w; ++x) {
        if (!removed[y * w + x]) continue;
        const double wx = (x > 0 ? 1.0 : 0.0) + (x + 1 < w ? 1.0 : 0.0);
        const double d = kEdge * (wy + wx) + kDiag * wy * wx;
        const int64_t i = at(y, x);
        r[i] = 1.0;
        d_r[i] = d;
        inv_d_r[i] = 1.0 / d;
      }
    }
  }
};

// sum_j w_j u(i + j) over the 8 neighbours of the padded cell i.
inline double neighbours(const double* __restrict u, int64_t i, int64_t s) {
  return kEdge * (u[i - 1] + u[i + 1] + u[i - s] + u[i + s]) +
         kDiag * (u[i - s - 1] + u[i - s + 1] + u[i + s - 1] + u[i + s + 1]);
}

// out = A u = D u - W u on the unknowns (0 elsewhere); u must be 0 off the unknowns.
void apply(const Grid& g, const double* __restrict u, double* __restrict out) {
  const int64_t s = g.stride;
  const double* r = g.r.data();
  const double* d_r = g.d_r.data();
  for (int64_t y = 0; y < g.h; ++y) {
    const int64_t row = g.at(y, 0);
    for (int64_t i = row; i < row + g.w; ++i) out[i] = d_r[i] * u[i] - r[i] * neighbours(u, i, s);
  }
}

// One Jacobi sweep on A e = rhs: e <- D^-1 (rhs + W e) on the unknowns (via g.tmp).
void jacobi(Grid& g) {
  const int64_t s = g.stride;
  const double* e = g.e.data();
  const double* rhs = g.rhs.data();
  const double* inv = g.inv_d_r.data();
  double* out = g.tmp.data();
  for (int64_t y = 0; y < g.h; ++y) {
    const int64_t row = g.at(y, 0);
    for (int64_t i = row; i < row + g.w; ++i) out[i] = inv[i] * (rhs[i] + neighbours(e, i, s));
  }
  g.e.swap(g.tmp);
}

// Dense Cholesky factor of the coarsest grid's matrix over its unknowns. SPD: D is the in-grid
// weight sum, so the matrix is diagonally dominant, strictly so next to a known cell, and every
// connected set of unknowns borders one (the cell over an image's visible pixel is never unknown).
void factor_coarsest(Grid& g) {
  g.unknowns.clear();
  for (int64_t y = 0; y < g.h; ++y)
    for (int64_t x = 0; x < g.w; ++x)
      if (g.r[g.at(y, x)] != 0.0) g.unknowns.push_back(g.at(y, x));
  const int64_t k = static_cast<int64_t>(g.unknowns.size());
  std::vector<double>& a = g.chol;
  a.assign(static_cast<size_t>(k * k), 0.0);
  const int64_t s = g.stride;
  for (int64_t p = 0; p < k; ++p) {
    const int64_t i = g.unknowns[p];
    for (int64_t q = 0; q < k; ++q) {
      const int64_t off = g.unknowns[q] - i;
      double v = 0.0;
      if (off == 0) v = g.d_r[i];
      else if (off == 1 || off == -1 || off == s || off == -s) v = -kEdge;
      else if (off == s + 1 || off == s - 1 || off == -s + 1 || off == -s - 1) v = -kDiag;
      a[p * k + q] = v;
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    double diag = a[j * k + j];
    for (int64_t t = 0; t < j; ++t) diag -= a[j * k + t] * a[j * k + t];
    TORCH_CHECK(diag > 0.0, "imputation_solve: coarsest system not positive definite (internal error)");
    diag = std::sqrt(diag);
    a[j * k + j] = diag;
    for (int64_t i = j + 1; i < k; ++i) {
      double v = a[i * k + j];
      for (int64_t t = 0; t < j; ++t) v -= a[i * k + t] * a[j * k + t];
      a[i * k + j] = v / diag;
    }
  }
}

void solve_coarsest(Grid& g) {
  const int64_t k = static_cast<int64_t>(g.unknowns.size());
  const double* l = g.chol.data();
  std::vector<double> y(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    double v = g.rhs[g.unknowns[i]];
    for (int64_t t = 0; t < i; ++t) v -= l[i * k + t] * y[t];
    y[i] = v / l[i * k + i];
  }
  for (int64_t i = k - 1; i >= 0; --i) {
    double v = y[i];
    for (int64_t t = i + 1; t < k; ++t) v -= l[t * k + i] * y[t];
    y[i] = v / l[i * k + i];
  }
  std::fill(g.e.begin(), g.e.end(), 0.0);
  for (int64_t i = 0; i < k; ++i) g.e[g.unknowns[i]] = y[i];
}

// e of grid `level` <- the V-cycle applied to its rhs.
void vcycle(std::vector<Grid>& grids, size_t level) {
  Grid& g = grids[level];
  if (level + 1 == grids.size()) {
    solve_coarsest(g);
    return;
  }
  const int64_t s = g.stride;
  for (size_t i = 0; i < g.size(); ++i) g.e[i] = g.inv_d_r[i] * g.rhs[i];  // first sweep, from zero
  for (int sweep = 1; sweep < kSweeps; ++sweep) jacobi(g);
  Grid& c = grids[level + 1];
  std::fill(c.rhs.begin(), c.rhs.end(), 0.0);
  {
    const double* e = g.e.data();
    const double* rhs = g.rhs.data();
    const double* r = g.r.data();
    const double* d_r = g.d_r.data();
    double* res = g.tmp.data();
    for (int64_t y = 0; y < g.h; ++y) {
      const int64_t row = g.at(y, 0);
      for (int64_t i = row; i < row + g.w; ++i) res[i] = rhs[i] - d_r[i] * e[i] + r[i] * neighbours(e, i, s);
      double* crow = c.rhs.data() + c.at(y / 2, 0);
      for (int64_t x = 0; x < g.w; ++x) crow[x / 2] += res[row + x];
    }
    for (size_t i = 0; i < c.size(); ++i) c.rhs[i] *= c.r[i];
  }
  vcycle(grids, level + 1);
  for (int64_t y = 0; y < g.h; ++y) {
    const int64_t row = g.at(y, 0);
    const double* crow = c.e.data() + c.at(y / 2, 0);
    for (int64_t x = 0; x < g.w; ++x) g.e[row + x] += kCoarseWeight * g.r[row + x] * crow[x / 2];
  }
  for (int sweep = 0; sweep < kSweeps; ++sweep) jacobi(g);
}

std::vector<Grid> build_grids(const uint8_t* removed, int64_t h, int64_t w) {
  std::vector<Grid> grids;
  std::vector<uint8_t> rem(removed, removed + h * w);
  grids.emplace_back(h, w);
  grids.back().set_unknowns(rem);
  while (std::max(h, w) > kCoarsest) {
    const int64_t hc = (h + 1) / 2, wc = (w + 1) / 2;
    std::vector<uint8_t> coarse(static_cast<size_t>(hc * wc), 0);
    for (int64_t y = 0; y < hc; ++y)
      for (int64_t x = 0; x < wc; ++x) {
        bool all = 2 * y + 1 < h && 2 * x + 1 < w;  // a cell cut by an odd border touches "visible"
        for (int64_t dy = 0; all && dy < 2; ++dy)
          for (int64_t dx = 0; all && dx < 2; ++dx) all = rem[(2 * y + dy) * w + 2 * x + dx] != 0;
        coarse[y * wc + x] = all;
      }
    rem.swap(coarse);
    h = hc;
    w = wc;
    grids.emplace_back(h, w);
    grids.back().set_unknowns(rem);
  }
  factor_coarsest(grids.back());
  return grids;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Preconditioned CG for one system; b and u are H x W planes (b read, u written). Returns the
// largest residual at the end.
double solve_one(std::vector<Grid>& grids, const double* b, double* u_out, double tol, int64_t max_iter) {
  Grid& g = grids[0];
  const size_t n = g.size();
  std::vector<double> u(n, 0.0), res(n, 0.0), p(n), ap(n, 0.0);
  double resid = 0.0;
  for (int64_t y = 0; y < g.h; ++y)
    for (int64_t x = 0; x < g.w; ++x) {
      const int64_t i = g.at(y, x);
      res[i] = g.r[i] * b[y * g.w + x];
      resid = std::max(resid, std::abs(res[i]));
    }
  auto precondition = [&]() {  // g.e <- M res (the V-cycle reads its rhs, never writes it)
    g.rhs.swap(res);
    vcycle(grids, 0);
    g.rhs.swap(res);
  };
  precondition();
  p = g.e;
  double rz = dot(res, g.e);
  for (int64_t it = 0; it < max_iter && resid > tol; ++it) {
    apply(g, p.data(), ap.data());
    const double pap = dot(p, ap);
    const double alpha = pap > 0.0 ? rz / pap : 0.0;
    resid = 0.0;
    for (size_t i = 0; i < n; ++i) {
      u[i] += alpha * p[i];
      res[i] -= alpha * ap[i];
      resid = std::max(resid, std::abs(res[i]));
    }
    if (resid <= tol) break;
    precondition();
    const double rz_new = dot(res, g.e);
    const double beta = rz > 0.0 ? rz_new / rz : 0.0;
    for (size_t i = 0; i < n; ++i) p[i] = g.e[i] + beta * p[i];
    rz = rz_new;
  }
  for (int64_t y = 0; y < g.h; ++y)
    for (int64_t x = 0; x < g.w; ++x) u_out[y * g.w + x] = u[g.at(y, x)];
  return resid;
}

std::tuple<at::Tensor, at::Tensor> imputation_solve(const at::Tensor& b, const at::Tensor& removed, double tol,
                                                    int64_t max_iter) {
  TORCH_CHECK(b.dim() == 4 && b.scalar_type() == at::kDouble, "imputation_solve: b must be N x C x H x W float64, got ",
              b.sizes(), " ", b.scalar_type());
  TORCH_CHECK(removed.dim() == 4 && removed.size(0) == b.size(0) && removed.size(1) == 1 &&
                  removed.size(2) == b.size(2) && removed.size(3) == b.size(3) &&
                  removed.scalar_type() == at::kBool,
              "imputation_solve: removed must be N x 1 x H x W bool matching b ", b.sizes(), ", got ",
              removed.sizes(), " ", removed.scalar_type());
  TORCH_CHECK(tol > 0.0, "imputation_solve: tol must be > 0, got ", tol);
  TORCH_CHECK(max_iter >= 0, "imputation_solve: max_iter must be >= 0, got ", max_iter);
  const at::Tensor bc = b.contiguous();
  const at::Tensor rc = removed.contiguous();
  const int64_t N = b.size(0), C = b.size(1), H = b.size(2), W = b.size(3);
  at::Tensor u = at::zeros_like(bc);
  at::Tensor resid = at::zeros({N, C}, b.options());
  if (b.numel() == 0) return {u, resid};
  const double* bp = bc.data_ptr<double>();
  const uint8_t* rp = reinterpret_cast<const uint8_t*>(rc.data_ptr<bool>());
  double* up = u.data_ptr<double>();
  double* resp = resid.data_ptr<double>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / C;
      std::vector<Grid> grids = build_grids(rp + n * H * W, H, W);
      resp[k] = solve_one(grids, bp + k * H * W, up + k * H * W, tol, max_iter);
    }
  });
  return {u, resid};
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_ops, CPU, m) { m.impl("imputation_solve", &imputation_solve); }

}  // namespace cpu
}  // namespace masked_ops
