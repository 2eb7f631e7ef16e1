//! Per-call scratch memory (the quantizers' workspace, the f16 copies of code values, the f32
//! output before its pack) from a stream-ordered memory pool of tessera's own that keeps what
//! it has mapped. The device's default pool, which `CudaStream::alloc` draws from, gives its
//! memory back at every synchronisation (release threshold 0), so a caller that waited after
//! each call had every call map its scratch again (tens of MB for the Nvfp4 recipe at
//! N = 4096; docs/benchmarks.md, fourteenth session). Under CUDA-graph capture the call takes
//! the default pool as before (CudaAttention::scratch): a captured allocation is a graph
//! memory node, whose memory the graph owns.

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// An owned `CUmemoryPool` on one device whose release threshold is "never".
pub(crate) struct ScratchPool(sys::CUmemoryPool);

// SAFETY: a pool handle is a driver object that any thread may use.
unsafe impl Send for ScratchPool {}
unsafe impl Sync for ScratchPool {}

impl ScratchPool {
    /// A pool on `ctx`'s device, or why not (no stream-ordered allocation there, or the driver
    /// refused): callers then allocate from the default pool.
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<ScratchPool, String> {
        if !ctx.has_async_alloc() {
            return Err("the device has no stream-ordered allocator".into());
        }
        ctx.bind_to_thread()
            .map_err(|e| format!("bind context: {e:?}"))?;
        // SAFETY: zero is a valid value of every field of the props struct (integers, enums
        // whose 0 is a variant, a null pointer); the three that matter are set below.
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = ctx.ordinal() as i32;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: out-pointer and props are live locals.
        checked(
            unsafe { sys::cuMemPoolCreate(&mut pool, &props) },
            "cuMemPoolCreate",
        )?;
        let pool = ScratchPool(pool);
        let mut keep = u64::MAX;
        // SAFETY: the attribute takes a cuuint64_t by pointer.
        let rc = unsafe {
            sys::cuMemPoolSetAttribute(
                pool.0,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
        };
        checked(rc, "cuMemPoolSetAttribute(release threshold)")?;
        Ok(pool)
    }

    /// `len` elements of `T` on `stream`, unset. Freed (back to this pool, stream ordered)
    /// when the slice drops.
    ///
    /// # Safety
    /// The memory is unset: the caller writes every element before any read.
    pub(crate) unsafe fn alloc<T: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        len: usize,
    ) -> Result<CudaSlice<T>, String> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("bind context: {e:?}"))?;
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: out-pointer is a live local; the pool lives as long as `self`, and a slice
        // freed after the pool's destruction is still valid (the driver releases a destroyed
        // pool once its last allocation is freed).
        let rc =
            unsafe { sys::cuMemAllocFromPoolAsync(&mut ptr, bytes, self.0, stream.cu_stream()) };
        checked(rc, "cuMemAllocFromPoolAsync")?;
        // SAFETY: a live allocation of at least len·size_of::<T>() bytes; CudaSlice frees it
        // with cuMemFreeAsync on `stream`, which returns it to this pool.
        Ok(unsafe { stream.upgrade_device_ptr(ptr, len) })
    }

    /// Bytes the pool holds mapped now (in use or kept for the next call).
    pub(crate) fn reserved_bytes(&self) -> Result<u64, String> {
        let mut bytes = 0u64;
        // SAFETY: the attribute is a cuuint64_t, written through the pointer.
        let rc = unsafe {
            sys::cuMemPoolGetAttribute(
                self.0,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                (&mut bytes as *mut u64).cast(),
            )
        };
        checked(rc, "cuMemPoolGetAttribute(reserved)").map(|_| bytes)
    }

    /// Gives back every byte no allocation is using (those of calls still in flight stay).
    pub(crate) fn trim(&self) -> Result<(), String> {
        // SAFETY: our own live pool.
        checked(
            unsafe { sys::cuMemPoolTrimTo(self.0, 0) },
            "cuMemPoolTrimTo",
        )
    }
}

/// A driver call's result as this module's error: the call and the driver's code.
fn checked(rc: sys::CUresult, call: &str) -> Result<(), String> {
    match rc {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(format!("{call}: {e:?}")),
    }
}

impl Drop for ScratchPool {
    fn drop(&mut self) {
        // SAFETY: our own handle, destroyed once; outstanding allocations keep the pool's
        // memory until they are freed (cuMemPoolDestroy's contract).
        unsafe { sys::cuMemPoolDestroy(self.0) };
    }
}
