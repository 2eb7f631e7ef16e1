//! Accuracy figures between two outputs: what the tests, the cross-check and the README report.

/// Agreement of `got` with `want` over the elements both define (non-NaN in `want`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    /// Cosine similarity.
    pub cos: f64,
    /// Σ|got − want| / Σ|want|.
    pub rel_l1: f64,
    /// sqrt(mean((got − want)²)).
    pub rmse: f64,
    /// max |got − want|.
    pub max_abs: f64,
    /// Elements compared.
    pub count: usize,
    /// Elements where exactly one side is NaN/Inf, or both are but differ.
    pub non_finite_mismatch: usize,
}

impl Accuracy {
    /// Compare element by element; positions where `want` is NaN are skipped only when `got` is
    /// NaN there too (a backend that invents or loses a NaN is counted as a mismatch, and so is
    /// every element one side has and the other lacks).
    pub fn of(got: &[f32], want: &[f32]) -> Accuracy {
        let (mut dot, mut gg, mut ww, mut l1, mut wl1, mut sq, mut max) =
            (0f64, 0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
        let (mut count, mut bad) = (0usize, got.len().abs_diff(want.len()));
        for (&g, &w) in got.iter().zip(want) {
            if !w.is_finite() || !g.is_finite() {
                let same = (w.is_nan() && g.is_nan()) || w == g;
                if !same {
                    bad += 1;
                }
                continue;
            }
            let (g, w) = (g as f64, w as f64);
            dot += g * w;
            gg += g * g;
            ww += w * w;
            l1 += (g - w).abs();
            wl1 += w.abs();
            sq += (g - w) * (g - w);
            max = max.max((g - w).abs());
            count += 1;
        }
        let cos = if gg == 0.0 && ww == 0.0 {
            1.0
        } else {
            dot / (gg.sqrt() * ww.sqrt()).max(f64::MIN_POSITIVE)
        };
        Accuracy {
            cos,
            rel_l1: if wl1 == 0.0 { l1 } else { l1 / wl1 },
            rmse: if count == 0 {
                0.0
            } else {
                (sq / count as f64).sqrt()
            },
            max_abs: max,
            count,
            non_finite_mismatch: bad,
        }
    }
}

impl std::fmt::Display for Accuracy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cos {:.6} rel-L1 {:.5} rmse {:.3e} max-abs {:.3e}",
            self.cos, self.rel_l1, self.rmse, self.max_abs
        )?;
        if self.non_finite_mismatch > 0 {
            write!(f, " ({} non-finite mismatches)", self.non_finite_mismatch)?;
        }
        Ok(())
    }
}
