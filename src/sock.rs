//! Socket helpers shared by client connections and Redis links.
//!
//! Reads wait for readiness (an io_uring PollAdd, or epoll) and then `recv` with MSG_DONTWAIT into
//! the spare capacity of a `BytesMut`: waiting for readiness can be cancelled without losing bytes,
//! and no buffer is pinned by the kernel while a connection is idle.

use bytes::BytesMut;
use std::io;
use std::os::fd::RawFd;

/// `recv(2)` without blocking into the spare capacity of `buf`. Ok(0) is end of stream;
/// `WouldBlock` means nothing is there yet.
pub fn recv_into(fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is allocated, writable memory of `spare.len()` bytes owned by `buf`; recv
    // writes at most that many bytes into it.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr() as *mut libc::c_void,
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised exactly `n` bytes after the current length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
