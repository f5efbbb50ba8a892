//! One frame sent to many idle sockets in one system call (io_uring), for the hub's direct
//! writes.
//!
//! Owns: each thread's io_uring instance, made at the thread's first batch, and the crate's
//! only `unsafe`: the kernel reads the frame's bytes and the descriptors while the ring works,
//! so [`send_all`] returns only once every send it submitted has completed. Every send is
//! `MSG_DONTWAIT`, so a full socket completes at once with `EAGAIN` (io_uring does not wait
//! for it) and nothing is left in the ring between batches. Where the kernel or a seccomp
//! filter refuses io_uring (the process logs it once), [`send_all`] returns `false` and the
//! caller sends with one `send(2)` per socket, as it would without this module.
//!
//! Why: a fan-out of a small frame to a thousand idle subscribers is a thousand `send`s, and
//! each one's entry into and exit from the kernel is a part of its cost that a ring submits
//! once per batch (README, "Performance").
//!
//! Must not: let the kernel use a buffer after [`send_all`]'s return (if the ring ever fails
//! mid-batch, the ring and the bytes are leaked, and a send whose outcome is unknown is
//! reported as [`Unknown`]: the caller ends that connection rather than guess), wait for a
//! socket, or decide who may write a socket (the outbox lends it; the caller holds the loan).

#[cfg(target_os = "linux")]
use std::cell::RefCell;
use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;

use bytes::Bytes;
#[cfg(target_os = "linux")]
use io_uring::{opcode, types, IoUring};

/// Sends per system call: each one holds its outbox's lock until the batch completes (a few
/// microseconds each), and more than this saves little more of the entry cost.
pub(crate) const BATCH: usize = 32;

/// A send the ring may or may not have made (it failed mid-batch): the socket's stream can
/// no longer be trusted, and its connection must end.
#[derive(Debug)]
pub(crate) struct Unknown;

impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("io_uring failed with this send in flight")
    }
}

impl std::error::Error for Unknown {}

/// Whether `error` is [`Unknown`].
pub(crate) fn is_unknown(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Unknown>())
}

/// Make this thread's ring now, if it has none yet: before a batch takes any outbox lock, so
/// that no session waits on the ring's set-up.
pub(crate) fn prepare() {
    #[cfg(target_os = "linux")]
    RING.with(|ring| {
        if let Ok(mut ring) = ring.try_borrow_mut() {
            if matches!(*ring, Ring::Unmade) {
                *ring = make().map_or(Ring::Off, |made| Ring::Made(Box::new(made)));
            }
        }
    });
}

#[cfg(target_os = "linux")]
/// How many times one batch enters the kernel before it is given up on (the kernel may take
/// part of a batch when short of memory; each entry takes at least one send).
const ENTRIES: usize = 64;

#[cfg(target_os = "linux")]
/// A send never raises `SIGPIPE` and never waits.
const FLAGS: i32 = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;

#[cfg(target_os = "linux")]
thread_local! {
    static RING: RefCell<Ring> = const { RefCell::new(Ring::Unmade) };
}

#[cfg(target_os = "linux")]
enum Ring {
    Unmade,
    Made(Box<IoUring>),
    /// Refused by the kernel (or given up on after a failure): one `send` per socket.
    Off,
}

/// Whether `IoUring::builder` works here; for the tests, which say so when it does not.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn available() -> bool {
    make().is_some()
}

#[cfg(target_os = "linux")]
fn make() -> Option<IoUring> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let ring = make_ring();
    if ring.is_none() {
        SAID.call_once(|| {
            tracing::info!(
                "io_uring is not available here (kernel, sysctl or seccomp): direct writes go \
                 one send per socket"
            );
        });
    }
    ring
}

#[cfg(target_os = "linux")]
fn make_ring() -> Option<IoUring> {
    let entries = BATCH as u32;
    // Submitted from this thread only, completions posted at once, and a send that fails at
    // submission (a closed socket) does not stop the ones after it. Older kernels refuse the
    // flags; the plain ring is then good enough.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_submit_all()
        .build(entries)
        .or_else(|_| IoUring::builder().build(entries))
        .ok()?;
    // A kernel with io_uring but without its send (before 5.6) would fail every entry.
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).ok()?;
    probe.is_supported(opcode::Send::CODE).then_some(ring)
}

#[cfg(target_os = "linux")]
/// Send `bytes` on each socket of `fds` (at most [`BATCH`]), non-blocking, and put in
/// `sent[i]` what `send(2)` would have returned for `fds[i]`. Returns `false`, with `sent`
/// untouched, when this thread has no ring: the caller sends itself.
pub(crate) fn send_all(
    bytes: &Bytes,
    fds: &[BorrowedFd<'_>],
    sent: &mut Vec<io::Result<usize>>,
) -> bool {
    debug_assert!(fds.len() <= BATCH);
    if u32::try_from(bytes.len()).is_err() {
        return false;
    }
    RING.with(|ring| {
        let Ok(mut ring) = ring.try_borrow_mut() else {
            return false;
        };
        if matches!(*ring, Ring::Unmade) {
            *ring = make().map_or(Ring::Off, |made| Ring::Made(Box::new(made)));
        }
        let Ring::Made(uring) = &mut *ring else {
            return false;
        };
        if submit(uring, bytes, fds, sent) {
            return true;
        }
        // The ring failed in a way it should not: whatever it may still hold must never
        // run, nor may the bytes it points to be freed. Leak both; this thread sends alone.
        if let Ring::Made(uring) = std::mem::replace(&mut *ring, Ring::Off) {
            std::mem::forget(uring);
            std::mem::forget(bytes.clone());
        }
        tracing::warn!("io_uring failed; direct writes go one send per socket on this thread");
        true
    })
}

/// Elsewhere: no ring; the caller sends itself.
#[cfg(not(target_os = "linux"))]
pub(crate) fn send_all(_: &Bytes, _: &[BorrowedFd<'_>], _: &mut Vec<io::Result<usize>>) -> bool {
    false
}

#[cfg(target_os = "linux")]
/// Submit one send per descriptor and reap them all; `false` if the ring failed: a send
/// never submitted is then reported as `WouldBlock` (it can never run: nobody enters this
/// ring again, and the caller queues its frame), one submitted but not reaped as
/// [`Unknown`].
fn submit(
    ring: &mut IoUring,
    bytes: &Bytes,
    fds: &[BorrowedFd<'_>],
    sent: &mut Vec<io::Result<usize>>,
) -> bool {
    sent.clear();
    sent.resize_with(fds.len(), || Err(io::Error::other(Unknown)));
    // A frame sent directly is at most `WRITE_BUFFER` bytes (checked by `send_all`).
    let len = bytes.len() as u32;
    {
        let mut queue = ring.submission();
        for (i, fd) in fds.iter().enumerate() {
            let entry = opcode::Send::new(types::Fd(fd.as_raw_fd()), bytes.as_ptr(), len)
                .flags(FLAGS)
                .build()
                .user_data(i as u64);
            // SAFETY: the entry points to `bytes` and to a descriptor the caller keeps open;
            // both outlive the send, because this function returns only once every entry
            // pushed here has completed, or (`false`) the caller leaks the ring and the bytes
            // so that neither an unsent entry nor its buffer can ever be used again. The
            // queue has room: it holds `BATCH` entries and is empty between batches.
            if unsafe { queue.push(&entry) }.is_err() {
                return false;
            }
        }
    }
    let mut done = 0;
    for _ in 0..ENTRIES {
        match ring.submit_and_wait(fds.len() - done) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {}
            Err(_) => break,
        }
        for completion in ring.completion() {
            let Some(slot) = sent.get_mut(completion.user_data() as usize) else {
                continue;
            };
            *slot = match completion.result() {
                n if n >= 0 => Ok(n as usize),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
            done += 1;
        }
        if done == fds.len() {
            return true;
        }
    }
    // Failed: the entries still queued (the last ones pushed) were never submitted.
    let unsubmitted = ring.submission().len().min(fds.len());
    for slot in &mut sent[fds.len() - unsubmitted..] {
        *slot = Err(io::ErrorKind::WouldBlock.into());
    }
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (server, client)
    }

    /// Every socket of a batch gets the bytes whole; a full one reports `WouldBlock` at once
    /// (the batch does not wait for it), and one whose reader is gone reports its error.
    #[test]
    fn a_batch_sends_to_each_socket_and_reports_each_result() {
        if !available() {
            eprintln!("io_uring refused here: the batch falls back to one send per socket");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut pairs: Vec<_> = (0..5).map(|_| pair(&listener)).collect();
        // Socket 3: filled until the kernel takes no more, also once what was in flight landed.
        let filler = vec![0u8; 1 << 16];
        for _ in 0..2 {
            while socket2::SockRef::from(&pairs[3].0).send(&filler).is_ok() {}
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Socket 5: its peer reset the connection.
        let reset = {
            let (server, client) = pair(&listener);
            socket2::SockRef::from(&client)
                .set_linger(Some(std::time::Duration::ZERO))
                .unwrap();
            drop(client);
            std::thread::sleep(std::time::Duration::from_millis(50));
            server
        };

        let bytes = Bytes::from_static(b"\x81\x05hello");
        let mut fds: Vec<BorrowedFd<'_>> = pairs.iter().map(|(s, _)| s.as_fd()).collect();
        fds.push(reset.as_fd());
        let mut sent = Vec::new();
        assert!(send_all(&bytes, &fds, &mut sent));
        assert_eq!(sent.len(), 6);
        for (i, result) in sent.iter().enumerate() {
            match i {
                3 => assert_eq!(
                    result.as_ref().unwrap_err().kind(),
                    io::ErrorKind::WouldBlock
                ),
                5 => assert!(result.is_err(), "a reset socket took the frame"),
                _ => assert_eq!(*result.as_ref().unwrap(), 7, "socket {i}"),
            }
        }
        for (i, (_, client)) in pairs.iter_mut().enumerate() {
            if i == 3 {
                continue;
            }
            let mut got = [0u8; 7];
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"\x81\x05hello", "socket {i}");
        }
        // The ring is empty again: a second batch on the same thread works the same.
        let fds = [pairs[0].0.as_fd()];
        assert!(send_all(&bytes, &fds, &mut sent));
        assert_eq!(*sent[0].as_ref().unwrap(), 7);
    }
}
