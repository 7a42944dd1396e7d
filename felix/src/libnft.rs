//! nft's own library, libnftables, loaded at run time: the same command language and the same
//! single-transaction batches as `nft -f -`, without starting a process for every change (about
//! 2 ms of CPU each, more in wall time on a busy node). Where the library cannot be loaded the
//! caller runs the `nft` tool instead.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// An nft context of libnftables (not shared between threads at once: `&mut self`).
pub struct Libnft {
    ctx: *mut c_void,
    free: CtxFree,
    run: RunCmd,
    output: CtxGetBuffer,
    error: CtxGetBuffer,
}

// SAFETY: the context is only used through `&mut self`, one call at a time; libnftables keeps no
// thread-local state for it. A shared `&Libnft` gives no access to it at all.
unsafe impl Send for Libnft {}
unsafe impl Sync for Libnft {}

impl std::fmt::Debug for Libnft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Libnft")
    }
}

/// Looks up `name` in the library `lib` as a function of type `T`.
///
/// SAFETY: `T` must be the symbol's true function type.
unsafe fn symbol<T: Copy>(lib: *mut c_void, name: &CStr) -> Option<T> {
    let sym = libc::dlsym(lib, name.as_ptr());
    (!sym.is_null()).then(|| std::mem::transmute_copy::<*mut c_void, T>(&sym))
}

impl Libnft {
    /// Loads libnftables and creates a context with buffered output and errors; `None` when the
    /// library or one of its functions is missing.
    pub fn open() -> Option<Libnft> {
        // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols' types are those of
        // libnftables.h (stable since libnftables 0.9); the library stays loaded for the process.
        unsafe {
            let lib = libc::dlopen(
                c"libnftables.so.1".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_LOCAL,
            );
            if lib.is_null() {
                return None;
            }
            let new: CtxNew = symbol(lib, c"nft_ctx_new")?;
            let free: CtxFree = symbol(lib, c"nft_ctx_free")?;
            let buffer_output: CtxBuffer = symbol(lib, c"nft_ctx_buffer_output")?;
            let buffer_error: CtxBuffer = symbol(lib, c"nft_ctx_buffer_error")?;
            let output: CtxGetBuffer = symbol(lib, c"nft_ctx_get_output_buffer")?;
            let error: CtxGetBuffer = symbol(lib, c"nft_ctx_get_error_buffer")?;
            let run: RunCmd = symbol(lib, c"nft_run_cmd_from_buffer")?;
            let ctx = new(0);
            if ctx.is_null() {
                return None;
            }
            let lib = Libnft {
                ctx,
                free,
                run,
                output,
                error,
            };
            if buffer_output(ctx) != 0 || buffer_error(ctx) != 0 {
                return None;
            }
            Some(lib)
        }
    }

    /// Runs `commands` (nft's command language, one transaction) and returns what nft printed;
    /// on failure, nft's error text.
    pub fn run(&mut self, commands: &str) -> Result<String, String> {
        let text = CString::new(commands).map_err(|_| "a NUL byte in nft commands".to_string())?;
        // SAFETY: a live context and a NUL-terminated buffer; the returned buffers are owned by
        // the context and valid until its next call, so they are copied at once.
        unsafe {
            let rc = (self.run)(self.ctx, text.as_ptr());
            let copy = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let output = copy((self.output)(self.ctx));
            let error = copy((self.error)(self.ctx));
            if rc == 0 {
                Ok(output)
            } else {
                Err(error.trim().to_string())
            }
        }
    }
}

impl Drop for Libnft {
    fn drop(&mut self) {
        // SAFETY: the context was created by nft_ctx_new and is freed once.
        unsafe { (self.free)(self.ctx) }
    }
}
