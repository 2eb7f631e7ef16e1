//! Tensor maps for Hopper's tensor copy engine (TMA). The wgmma shape of the tensor-core kernel
//! at head dims 128 and 64 loads its K and V tiles with them (kernels/attention_mma.cu, `produce`):
//! boxes of 64 rows × 128 bytes, 128-byte swizzled, zero-filled outside the tensor.

use cudarc::driver::{sys, DeviceRepr};

/// A `CUtensorMap`, passed by value to the kernel (`struct TmaMap`, a `__grid_constant__`).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct TmaMap(sys::CUtensorMap);

// SAFETY: 128 bytes of plain data, the size of the kernel's `struct TmaMap`.
unsafe impl DeviceRepr for TmaMap {}

impl TmaMap {
    /// For kernels that never read it (every shape but wgmma with TMA).
    pub(crate) fn unused() -> TmaMap {
        // SAFETY: an all-zero opaque struct of integers.
        TmaMap(unsafe { std::mem::zeroed() })
    }

    /// Rows of `dims[0]` elements of `elem` bytes (1 or 2) at device address `ptr`; dims are
    /// (row elements, tokens, heads, batch), `strides` the byte strides of tokens, heads and
    /// batch. Box: `box_inner` elements (128 or 64 bytes, swizzled as wide) × 64 tokens.
    pub(crate) fn rows(
        ptr: u64,
        elem: u32,
        dims: [u64; 4],
        strides: [u64; 3],
        box_inner: u32,
    ) -> Result<TmaMap, String> {
        if ptr % 16 != 0 || strides.iter().any(|s| s % 16 != 0 || *s == 0) {
            return Err(format!(
                "tensor map: address {ptr:#x} or strides {strides:?} not multiples of 16 bytes"
            ));
        }
        let swizzle = swizzle_as_wide(box_inner * elem)?;
        tiled(ptr, elem, &dims, &strides, &[box_inner, 64, 1, 1], swizzle)
    }

    /// Rows of `row_elems` elements of `elem` bytes (1 or 2), `row_bytes` apart, `rows` of them,
    /// as a 5-d map whose box of 64 rows starting at any row R holds, at row 8n + 2t + e, the
    /// tensor's row R + 16t + 2n + e: dims (element, e, t, n, row) with row strides
    /// (1, 16, 2, 1), not increasing (the KPERM kernels, kernels/attention_mma.cu `key_in_tile`:
    /// a thread's 16 scores of a row are then 16 consecutive keys). Box: `box_inner` elements
    /// (128 or 64 bytes, swizzled as wide) × 64 rows; coordinate 4 is R. The copy engine checks
    /// only R against `rows`: the caller never asks for a box past the end (the kernel fills a
    /// ragged last tile itself).
    pub(crate) fn permuted_rows(
        ptr: u64,
        elem: u32,
        row_elems: u64,
        box_inner: u32,
        row_bytes: u64,
        rows: u64,
    ) -> Result<TmaMap, String> {
        if ptr % 16 != 0 || row_bytes % 16 != 0 || rows < 64 {
            return Err(format!(
                "permuted tensor map: address {ptr:#x}, row stride {row_bytes} (multiples of 16) \
                 and {rows} rows (64 or more) needed"
            ));
        }
        let swizzle = swizzle_as_wide(box_inner * elem)?;
        let r = row_bytes;
        tiled(
            ptr,
            elem,
            &[row_elems, 2, 4, 8, rows],
            &[r, 16 * r, 2 * r, r],
            &[box_inner, 2, 4, 8, 1],
            swizzle,
        )
    }
}

/// The swizzle of a box row of `bytes` (128 or 64): as wide as the row.
fn swizzle_as_wide(bytes: u32) -> Result<sys::CUtensorMapSwizzle, String> {
    match bytes {
        128 => Ok(sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B),
        64 => Ok(sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B),
        w => Err(format!(
            "tensor map: {w}-byte box rows (128 or 64 expected)"
        )),
    }
}

/// cuTensorMapEncodeTiled for `dims.len()` dimensions (innermost first; `strides` in bytes for
/// all but the innermost), unit element strides, zero fill outside the tensor.
fn tiled(
    ptr: u64,
    elem: u32,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
    swizzle: sys::CUtensorMapSwizzle,
) -> Result<TmaMap, String> {
    let dtype = match elem {
        1 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
    };
    let rank = dims.len();
    if strides.len() + 1 != rank || boxes.len() != rank || !(1..=5).contains(&rank) {
        return Err(format!(
            "tensor map: rank {rank} with {} strides and {} boxes",
            strides.len(),
            boxes.len()
        ));
    }
    let unit = [1u32; 5];
    let mut map = TmaMap::unused();
    // SAFETY: every pointer is to a live array of at least the rank (rank − 1 for strides).
    let rc = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            dtype,
            rank as u32,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            unit.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    match rc {
        sys::CUresult::CUDA_SUCCESS => Ok(map),
        e => Err(format!(
            "cuTensorMapEncodeTiled: {e:?} (dims {dims:?}, strides {strides:?})"
        )),
    }
}
