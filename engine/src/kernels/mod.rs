//! CPU kernels for the training hot paths, run on the flex backend's own memory: a tensor's
//! storage is borrowed through burn's extension API (`try_into_primitive::<Flex>`, an `Arc`
//! clone, no copy) and results are wrapped back without copying. On other devices the callers
//! use the burn-op versions in [`crate::train::ops`].
//!
//! Hot loops are compiled three times, for baseline x86-64, AVX2+FMA and AVX-512, and
//! dispatched at run time (`simd!`), so binaries stay portable. The three compute the same
//! IEEE operations in the same order (reductions keep explicit partial sums), so their results
//! are bit-identical (tested).

pub mod attention;
pub mod blas;
pub mod elementwise;
pub mod fastmath;
pub mod skinny;

use burn::backend::Flex;
use burn::tensor::{Device, Tensor, TensorData};
use burn_flex::FlexTensor;

/// A contiguous f32 flex tensor borrowed as a slice.
pub struct Host {
    t: FlexTensor,
}

impl Host {
    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        self.t
            .as_slice::<f32>()
            .expect("made contiguous f32 in `host`")
    }
}

/// Borrows `t`'s storage when it is an f32 tensor on the flex backend (made contiguous if it
/// is a strided view); `None` on other devices or dtypes.
pub fn host<const D: usize>(t: &Tensor<D>) -> Option<Host> {
    if t.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let p: FlexTensor = t.clone().try_into_primitive::<Flex>().ok()?;
    let p = if p.is_contiguous() && p.as_slice::<f32>().is_some() {
        p
    } else {
        p.to_contiguous()
    };
    p.as_slice::<f32>()?;
    Some(Host { t: p })
}

/// A contiguous bf16 flex tensor borrowed as a slice.
pub struct HostBf16 {
    t: FlexTensor,
}

impl HostBf16 {
    /// The values, row-major.
    pub fn data(&self) -> &[half::bf16] {
        self.t
            .as_slice::<half::bf16>()
            .expect("made contiguous bf16 in `host_bf16`")
    }
}

/// Borrows `t`'s storage when it is a bf16 tensor on the flex backend (made contiguous if it
/// is a strided view); `None` on other devices or dtypes.
pub fn host_bf16<const D: usize>(t: &Tensor<D>) -> Option<HostBf16> {
    if t.dtype() != burn::tensor::DType::BF16 {
        return None;
    }
    let p: FlexTensor = t.clone().try_into_primitive::<Flex>().ok()?;
    let p = if p.is_contiguous() {
        p
    } else {
        p.to_contiguous()
    };
    p.as_slice::<half::bf16>()?;
    Some(HostBf16 { t: p })
}

/// Output storage of `len` values that parallel tasks initialise: nothing is zeroed on the
/// calling thread (that pass would leave the other cores idle).
pub(crate) struct Uninit {
    v: Vec<f32>,
    len: usize,
}

impl Uninit {
    /// Room for `len` values.
    pub(crate) fn new(len: usize) -> Self {
        Uninit {
            v: Vec::with_capacity(len),
            len,
        }
    }

    /// The uninitialised values, for `par_chunks_mut` and [`init`].
    pub(crate) fn spare(&mut self) -> &mut [std::mem::MaybeUninit<f32>] {
        &mut self.v.spare_capacity_mut()[..self.len]
    }

    /// A pointer through which tasks write disjoint parts of the storage.
    pub(crate) fn shared(&mut self) -> SharedOut {
        SharedOut::new(self.spare().as_mut_ptr().cast(), self.len)
    }

    /// The values.
    ///
    /// # Safety
    /// Every value must have been written (through [`init`] or [`SharedOut::put`]).
    pub(crate) unsafe fn assume_init(mut self) -> Vec<f32> {
        // SAFETY: the caller initialised the first `len` values; capacity ≥ len.
        unsafe { self.v.set_len(self.len) };
        self.v
    }
}

/// Zeroes a chunk of [`Uninit::spare`] on the worker that fills it, and views it as values
/// (kernels take `&mut [f32]`, which must not point at uninitialised memory).
pub(crate) fn init(s: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    for v in s.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was just written, and `MaybeUninit<f32>` has f32's layout.
    unsafe { &mut *(s as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// A raw output pointer shared by the parallel tasks of one call, each writing its own part.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: the tasks of one call write disjoint elements (each user's SAFETY comment says how),
// and the buffer outlives the call.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// `len` values at `ptr`.
    pub(crate) fn new(ptr: *mut f32, len: usize) -> Self {
        SharedOut { ptr, len }
    }

    /// The pointer `off` values in (for foreign calls that take strides; a method, so that
    /// closures capture the whole `Send` wrapper).
    pub(crate) fn at(self, off: usize) -> *mut f32 {
        self.ptr.wrapping_add(off)
    }

    /// Copies `src` to `[off, off + src.len())`.
    ///
    /// # Safety
    /// No other thread may touch that range during the call.
    pub(crate) unsafe fn put(self, off: usize, src: &[f32]) {
        assert!(off + src.len() <= self.len, "shared output bounds");
        // SAFETY: in bounds (checked), and the caller owns the range.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) }
    }
}

/// Wraps a vector as a tensor on `device` (no copy on the flex backend).
pub fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Whether tensors on `device` can use these kernels.
pub fn available(device: &Device) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
}

/// The widest instruction set `simd!` may use: 2 = AVX-512, 1 = AVX2+FMA, 0 = baseline
/// (lowered by tests that compare the paths).
pub(crate) static SIMD_LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Runs `$body` compiled for AVX-512 (F, VL, BW, DQ) or AVX2+FMA when the CPU has them, else
/// for the baseline target.
/// `$body` is a closure-free expression; locals it uses must be passed as `name: Type` pairs.
/// Internal to the engine (`crate::kernels::simd!`), not public API.
macro_rules! simd {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                let level = $crate::kernels::SIMD_LEVEL.load(std::sync::atomic::Ordering::Relaxed);
                if level >= 2
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the features were detected at run time.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if level >= 1
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected at run time.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd;

/// One term `alpha·op(a)·op(b)` of [`matmul_sum`]; `op` transposes when the flag is set.
pub struct Term<'a> {
    /// Left factor.
    pub a: &'a Tensor<2>,
    /// Whether the left factor is used transposed.
    pub ta: bool,
    /// Right factor.
    pub b: &'a Tensor<2>,
    /// Whether the right factor is used transposed.
    pub tb: bool,
    /// Scale.
    pub alpha: f32,
}

impl<'a> Term<'a> {
    /// `a·bᵀ` (a projection `x·Wᵀ` with `W` `[out, in]`).
    pub fn nt(a: &'a Tensor<2>, b: &'a Tensor<2>, alpha: f32) -> Self {
        Term {
            a,
            ta: false,
            b,
            tb: true,
            alpha,
        }
    }

    /// `a·b`.
    pub fn nn(a: &'a Tensor<2>, b: &'a Tensor<2>, alpha: f32) -> Self {
        Term {
            a,
            ta: false,
            b,
            tb: false,
            alpha,
        }
    }

    /// `aᵀ·b` (a weight gradient `dyᵀ·x`).
    pub fn tn(a: &'a Tensor<2>, b: &'a Tensor<2>, alpha: f32) -> Self {
        Term {
            a,
            ta: true,
            b,
            tb: false,
            alpha,
        }
    }

    /// `(m, k, n)` of `op(a)·op(b)`.
    fn dims(&self) -> (usize, usize, usize) {
        let [ar, ac] = self.a.dims();
        let [br, bc] = self.b.dims();
        let (m, k) = if self.ta { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.tb { (bc, br) } else { (br, bc) };
        assert_eq!(k, k2, "matmul_sum: inner dimensions differ");
        (m, k, n)
    }
}

/// `Σ alpha·op(a)·op(b)` over `terms` (all `[m, n]`), accumulated in one output buffer. Runs
/// through the system BLAS ([`blas`]) when one is loaded and the tensors live on the flex
/// backend; otherwise through burn's matrix product.
///
/// # Panics
/// When `terms` is empty or the shapes disagree.
pub fn matmul_sum(terms: &[Term<'_>]) -> Tensor<2> {
    assert!(!terms.is_empty(), "matmul_sum: no terms");
    let (m, _, n) = terms[0].dims();
    for t in terms {
        let (mi, _, ni) = t.dims();
        assert_eq!((mi, ni), (m, n), "matmul_sum: output shapes differ");
    }
    matmul_sum_with(blas::get(), terms, m, n)
}

fn matmul_sum_with(blas: Option<&blas::Blas>, terms: &[Term<'_>], m: usize, n: usize) -> Tensor<2> {
    use burn::tensor::DType;
    let f32 = DType::F32;
    // A term that mixes f32 with a 16-bit weight is a bf16 product when the BLAS has one;
    // otherwise its 16-bit operand is widened to f32 (exactly) for this sum. Terms whose
    // operands share a dtype (a model run in bf16 through burn) keep it.
    let bf16 = blas.is_some_and(blas::Blas::has_bf16);
    let widened = |t: &Term<'_>| {
        let (a, b) = (t.a.dtype(), t.b.dtype());
        a != b
            && !(bf16
                && matches!(
                    (a, b),
                    (DType::F32, DType::BF16) | (DType::BF16, DType::F32)
                ))
    };
    if terms.iter().any(widened) {
        let widen = |x: &Tensor<2>| {
            if x.dtype() == f32 {
                x.clone()
            } else {
                x.clone().cast(f32)
            }
        };
        let wide: Vec<(Tensor<2>, Tensor<2>)> =
            terms.iter().map(|t| (widen(t.a), widen(t.b))).collect();
        let terms: Vec<Term<'_>> = terms
            .iter()
            .zip(&wide)
            .map(|(t, (a, b))| Term {
                a,
                ta: t.ta,
                b,
                tb: t.tb,
                alpha: t.alpha,
            })
            .collect();
        return matmul_sum_with(blas, &terms, m, n);
    }
    if let Some(out) = skinny_sum(terms, m, n) {
        return tensor(out, [m, n], &terms[0].a.device());
    }
    if let Some(out) = blas.and_then(|b| blas_sum(b, terms, m, n)) {
        return tensor(out, [m, n], &terms[0].a.device());
    }
    let op = |x: &Tensor<2>, t: bool| if t { x.clone().transpose() } else { x.clone() };
    terms
        .iter()
        .map(|t| {
            let p = op(t.a, t.ta).matmul(op(t.b, t.tb));
            if t.alpha == 1.0 { p } else { p * t.alpha }
        })
        .reduce(|x, y| x + y)
        .expect("non-empty")
}

/// Products of at most [`skinny::MAX_ROWS`] rows against weights (`x·Wᵀ` terms, f32 on the
/// flex backend): [`skinny::product_nt`], which reads each weight once.
fn skinny_sum(terms: &[Term<'_>], m: usize, n: usize) -> Option<Vec<f32>> {
    if m > skinny::MAX_ROWS || terms.iter().any(|t| t.ta || !t.tb) {
        return None;
    }
    let stores: Vec<(Host, Host)> = terms
        .iter()
        .map(|t| Some((host(t.a)?, host(t.b)?)))
        .collect::<Option<_>>()?;
    let parts: Vec<skinny::Part<'_>> = terms
        .iter()
        .zip(&stores)
        .map(|(t, (a, b))| skinny::Part {
            alpha: t.alpha,
            x: a.data(),
            w: b.data(),
            k: t.dims().1,
        })
        .collect();
    Some(skinny::product_nt(m, n, &parts))
}

/// One operand of [`blas_sum`]: a flex tensor's contiguous storage (f32 or bf16), or an f32
/// operand rounded to bf16 to meet a bf16 partner.
enum Store {
    Flex(FlexTensor),
    Rounded(Vec<half::bf16>),
}

impl Store {
    /// `t`'s storage when it is an f32 or bf16 tensor on the flex backend.
    fn of(t: &Tensor<2>) -> Option<Store> {
        use burn::tensor::DType;
        if !matches!(t.dtype(), DType::F32 | DType::BF16) {
            return None;
        }
        let p: FlexTensor = t.clone().try_into_primitive::<Flex>().ok()?;
        let p = if p.is_contiguous() {
            p
        } else {
            p.to_contiguous()
        };
        let s = Store::Flex(p);
        s.values().is_some().then_some(s)
    }

    fn values(&self) -> Option<blas::Values<'_>> {
        match self {
            Store::Flex(p) => p
                .as_slice::<f32>()
                .map(blas::Values::F32)
                .or_else(|| p.as_slice::<half::bf16>().map(blas::Values::Bf16)),
            Store::Rounded(v) => Some(blas::Values::Bf16(v)),
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self.values(), Some(blas::Values::Bf16(_)))
    }

    /// The values rounded to the nearest bf16 (as PyTorch's autocast rounds activations).
    fn rounded(self) -> Store {
        use rayon::prelude::*;
        match self.values() {
            Some(blas::Values::F32(v)) => {
                Store::Rounded(v.par_iter().map(|&x| half::bf16::from_f32(x)).collect())
            }
            _ => self,
        }
    }
}

fn blas_sum(b: &blas::Blas, terms: &[Term<'_>], m: usize, n: usize) -> Option<Vec<f32>> {
    // A term with one bf16 operand (a 16-bit base weight) is a bf16 product: its other
    // operand is rounded to bf16 and the library accumulates in f32.
    let stores: Vec<(Store, Store)> = terms
        .iter()
        .map(|t| {
            let (sa, sb) = (Store::of(t.a)?, Store::of(t.b)?);
            match (sa.is_bf16(), sb.is_bf16()) {
                (true, false) => Some((sa, sb.rounded())),
                (false, true) => Some((sa.rounded(), sb)),
                (false, false) => Some((sa, sb)),
                // A bf16 model's own product stays in burn, in bf16.
                (true, true) => None,
            }
        })
        .collect::<Option<_>>()?;
    // Thinnest term first: it writes the buffer (the rank-r LoRA terms, a pass over memory),
    // and the large products then accumulate onto it, where reading C hides under their
    // arithmetic (a thin product with beta = 1 after them would read and write C again).
    let mut order: Vec<usize> = (0..terms.len()).collect();
    order.sort_by_key(|&i| terms[i].dims().1);
    let parts: Vec<blas::Part<'_>> = order
        .iter()
        .map(|&i| {
            let (t, (sa, sb)) = (&terms[i], &stores[i]);
            let [_, ac] = t.a.dims();
            let [_, bc] = t.b.dims();
            blas::Part {
                k: t.dims().1,
                alpha: t.alpha,
                a: blas::Operand {
                    data: sa.values().expect("checked in Store::of"),
                    ld: ac,
                    trans: t.ta,
                },
                b: blas::Operand {
                    data: sb.values().expect("checked in Store::of"),
                    ld: bc,
                    trans: t.tb,
                },
            }
        })
        .collect();
    Some(b.product_sum(m, n, &parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// A projection's `x` `[130, 48]`, `W` `[70, 48]`, LoRA's `u` `[130, 8]` and `B`
    /// `[70, 8]`, and an output gradient `dy` `[130, 70]`, random.
    fn operands() -> (Tensor<2>, Tensor<2>, Tensor<2>, Tensor<2>, Tensor<2>) {
        let dev = Device::flex();
        let r = |s: [usize; 2]| Tensor::<2>::random(s, Distribution::Normal(0.0, 1.0), &dev);
        (
            r([130, 48]),
            r([70, 48]),
            r([130, 8]),
            r([70, 8]),
            r([130, 70]),
        )
    }

    #[test]
    fn blas_and_burn_sums_agree() {
        let Some(b) = blas::get() else {
            eprintln!("no BLAS installed; nothing to compare");
            return;
        };
        let (x, w, u, bm, dy) = operands();
        let cases: Vec<Vec<Term<'_>>> = vec![
            vec![Term::nt(&x, &w, 1.0), Term::nt(&u, &bm, 0.5)],
            vec![Term::nn(&dy, &w, 1.0)],
            vec![Term::tn(&dy, &x, 2.0)],
            vec![Term::tn(&dy, &u, 1.0)],
        ];
        for terms in &cases {
            let (m, _, n) = terms[0].dims();
            let ours = matmul_sum_with(Some(b), terms, m, n).into_data();
            let burn = matmul_sum_with(None, terms, m, n).into_data();
            ours.assert_approx_eq::<f32>(&burn, burn::tensor::Tolerance::absolute(1e-4));
        }
    }

    #[test]
    fn a_bf16_weight_is_a_bf16_product_or_widened_without_one() {
        use burn::tensor::{DType, Tolerance};
        let (x, w, u, bm, dy) = operands();
        let wb = w.cast(DType::BF16);
        assert_eq!(wb.dtype(), DType::BF16);
        let rounded = |t: &Tensor<2>| t.clone().cast(DType::BF16).cast(DType::F32);
        let (xr, dyr, wr) = (rounded(&x), rounded(&dy), wb.clone().cast(DType::F32));
        // (terms with the bf16 weight, autocast's f32 equivalent, the widened equivalent)
        let forward = (
            vec![Term::nt(&x, &wb, 1.0), Term::nt(&u, &bm, 0.5)],
            vec![Term::nt(&xr, &wr, 1.0), Term::nt(&u, &bm, 0.5)],
            vec![Term::nt(&x, &wr, 1.0), Term::nt(&u, &bm, 0.5)],
        );
        let backward = (
            vec![Term::nn(&dy, &wb, 1.0)],
            vec![Term::nn(&dyr, &wr, 1.0)],
            vec![Term::nn(&dy, &wr, 1.0)],
        );
        let mut libraries: Vec<Option<blas::Blas>> = vec![None];
        libraries.extend(blas::every_blas().into_iter().map(Some));
        let xb = x.clone().cast(DType::BF16);
        for lib in &libraries {
            // A model run in bf16 (`eval --dtype bf16`) keeps its dtype.
            let own = matmul_sum_with(lib.as_ref(), &[Term::nt(&xb, &wb, 1.0)], 130, 70);
            assert_eq!(own.dtype(), DType::BF16);
            for (half, autocast, widened) in [&forward, &backward] {
                let (m, _, n) = half[0].dims();
                let got = matmul_sum_with(lib.as_ref(), half, m, n).into_data();
                let bf16 = lib.as_ref().is_some_and(blas::Blas::has_bf16);
                let want = matmul_sum_with(None, if bf16 { autocast } else { widened }, m, n);
                got.assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-4));
            }
        }
    }
}
