//! mvlt patch (vendor/README.md): c10d, PyTorch's distributed engine, from Rust: a TCPStore
//! (rendezvous and small exchanges between processes), a Gloo process group, and all-reduce,
//! broadcast and barrier on libtorch tensors, each bounded by the group's timeout. The C++ side is
//! `c10d.cpp`, compiled by the build script against the libtorch headers tch builds with.
//!
//! Gloo moves CPU tensors; a CUDA tensor handed to Gloo is staged through host memory by c10d.
//! NCCL (`ProcessGroupNCCL`, in `libtorch_cuda.so`) is not bridged yet: its header needs NCCL's
//! own, which the build does not look for.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::time::Duration;
use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn burn_tch_c10d_last_error() -> *const c_char;
    fn burn_tch_c10d_store(
        host: *const c_char,
        port: c_int,
        listen_fd: c_int,
        world: c_int,
        timeout_ms: i64,
        prefix: *const c_char,
        out: *mut *mut c_void,
    ) -> c_int;
    fn burn_tch_c10d_store_free(store: *mut c_void);
    fn burn_tch_c10d_store_set(store: *mut c_void, key: *const c_char, data: *const u8, len: usize) -> c_int;
    fn burn_tch_c10d_store_get(store: *mut c_void, key: *const c_char, data: *mut *mut u8, len: *mut usize) -> c_int;
    fn burn_tch_c10d_bytes_free(data: *mut u8);
    fn burn_tch_c10d_store_check(store: *mut c_void, key: *const c_char, found: *mut c_int) -> c_int;
    fn burn_tch_c10d_gloo(
        store: *mut c_void,
        rank: c_int,
        world: c_int,
        hostname: *const c_char,
        interface: *const c_char,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn burn_tch_c10d_group_free(group: *mut c_void);
    fn burn_tch_c10d_all_reduce_sum(group: *mut c_void, tensor: *mut C_tensor) -> c_int;
    fn burn_tch_c10d_broadcast(group: *mut c_void, tensor: *mut C_tensor, root: c_int) -> c_int;
    fn burn_tch_c10d_barrier(group: *mut c_void) -> c_int;
}

fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its NUL-terminated thread-local buffer (or a literal).
    unsafe { CStr::from_ptr(burn_tch_c10d_last_error()) }.to_string_lossy().into_owned()
}

fn check(rc: c_int) -> Result<(), String> {
    if rc == 0 { Ok(()) } else { Err(last_error()) }
}

fn c_string(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} holds a NUL byte"))
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// A c10d TCPStore: a key-value store every process of a group reaches.
pub struct Store {
    ptr: *mut c_void,
}

// SAFETY: c10d's stores are used from several threads by c10d itself (its client serialises the
// requests); the handle is only freed on drop.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

/// Who hosts a [`Store`].
pub enum StoreRole {
    /// This process: the store takes over `listen_fd`, a socket the caller bound and listens on
    /// (so that the caller chooses the address it binds, and a port in use fails there).
    Server {
        /// The listening socket's file descriptor (the store owns it from then on).
        listen_fd: i32,
    },
    /// Another process (rank 0, or torchrun's agent).
    Client,
}

impl Store {
    /// The store at `host:port` for `world` processes; requests wait at most `timeout`. Keys
    /// live under `prefix` when it is not empty.
    pub fn new(
        host: &str,
        port: u16,
        role: StoreRole,
        world: usize,
        timeout: Duration,
        prefix: &str,
    ) -> Result<Store, String> {
        let host = c_string("the store's host", host)?;
        let prefix = c_string("the store's key prefix", prefix)?;
        let fd = match role {
            StoreRole::Server { listen_fd } => listen_fd,
            StoreRole::Client => -1,
        };
        let mut ptr = std::ptr::null_mut();
        // SAFETY: the strings live through the call; `ptr` is written before any return.
        check(unsafe {
            burn_tch_c10d_store(
                host.as_ptr(),
                port as c_int,
                fd,
                world as c_int,
                millis(timeout),
                prefix.as_ptr(),
                &mut ptr,
            )
        })?;
        Ok(Store { ptr })
    }

    /// Set `key` to `value`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        let key = c_string("a store key", key)?;
        // SAFETY: a live store; the key and value are borrowed for the call.
        check(unsafe { burn_tch_c10d_store_set(self.ptr, key.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// The value of `key`, waiting for another process to set it (up to the store's timeout).
    pub fn get(&self, key: &str) -> Result<Vec<u8>, String> {
        let key = c_string("a store key", key)?;
        let (mut data, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: a live store; on success `data` holds `len` bytes the shim malloc'ed.
        check(unsafe { burn_tch_c10d_store_get(self.ptr, key.as_ptr(), &mut data, &mut len) })?;
        // SAFETY: as above; freed once, right after the copy.
        let value = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        unsafe { burn_tch_c10d_bytes_free(data) };
        Ok(value)
    }
}

impl Store {
    /// Whether `key` is set, without waiting.
    pub fn check(&self, key: &str) -> Result<bool, String> {
        let key = c_string("a store key", key)?;
        let mut found = 0;
        // SAFETY: a live store; the key is borrowed for the call.
        check(unsafe { burn_tch_c10d_store_check(self.ptr, key.as_ptr(), &mut found) })?;
        Ok(found != 0)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle came from `burn_tch_c10d_store` and is freed once.
        unsafe { burn_tch_c10d_store_free(self.ptr) }
    }
}

/// Which network address a Gloo group's sockets bind.
pub enum Bind {
    /// The address of this host name or IP (e.g. `127.0.0.1` for one machine).
    Hostname(String),
    /// The address of this network interface (e.g. `eth0`; PyTorch's `GLOO_SOCKET_IFNAME`).
    Interface(String),
    /// The address the machine's host name resolves to (Gloo's default).
    Default,
}

/// A Gloo process group: `world` processes, this one `rank`.
pub struct ProcessGroup {
    ptr: *mut c_void,
    /// This process's rank.
    pub rank: usize,
    /// The number of ranks.
    pub world: usize,
}

// SAFETY: c10d's process groups take collectives from any thread (one at a time here: every
// method takes `&self` but the trainer calls them from its own thread, in the same order on
// every rank, as collectives require).
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Rendezvous through `store` (which must have room for `world` processes) and connect the
    /// group; every collective then fails after `timeout` rather than wait for a missing rank.
    pub fn gloo(store: &Store, rank: usize, world: usize, bind: &Bind, timeout: Duration) -> Result<Self, String> {
        let (host, iface) = match bind {
            Bind::Hostname(h) => (Some(c_string("the bind address", h)?), None),
            Bind::Interface(i) => (None, Some(c_string("the network interface", i)?)),
            Bind::Default => (None, None),
        };
        let ptr_of = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut ptr = std::ptr::null_mut();
        // SAFETY: a live store; the strings live through the call; `ptr` is written before any return.
        check(unsafe {
            burn_tch_c10d_gloo(
                store.ptr,
                rank as c_int,
                world as c_int,
                ptr_of(&host),
                ptr_of(&iface),
                millis(timeout),
                &mut ptr,
            )
        })?;
        Ok(ProcessGroup { ptr, rank, world })
    }

    /// Sum `tensor` over the ranks, in place (every rank ends with the sum).
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), String> {
        // SAFETY: a live group and a live tensor, written in place by c10d during the call.
        check(unsafe { burn_tch_c10d_all_reduce_sum(self.ptr, tensor.as_mut_ptr()) })
    }

    /// Rank `root`'s `tensor` into every rank's, in place.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), String> {
        // SAFETY: as in `all_reduce_sum`.
        check(unsafe { burn_tch_c10d_broadcast(self.ptr, tensor.as_mut_ptr(), root as c_int) })
    }

    /// Returns once every rank has called it (or fails after the timeout).
    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: a live group.
        check(unsafe { burn_tch_c10d_barrier(self.ptr) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from `burn_tch_c10d_gloo` and is freed once.
        unsafe { burn_tch_c10d_group_free(self.ptr) }
    }
}
