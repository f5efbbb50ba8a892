//! Large payloads copied once into a sealed memory file, so that every socket they go to
//! takes the file's pages by reference instead of copying the payload again (SPEC §4).
//!
//! Owns: the files, and the table that finds a payload's file from the payload itself. The
//! hub calls [`share_frame`] on a large frame before it fans it out to many subscribers;
//! the frame keeps travelling as the same `Bytes` (its bytes, length and address do not
//! change), and [`crate::server::write::socket::Socket`] asks [`file_of`] when it makes the
//! payload a tail, then sends it with `sendfile(2)` from the file instead of `writev(2)` from
//! memory. The kernel then links the file's pages into each socket's queue: a 256 KiB frame
//! to 100 subscribers is one copy into the file instead of 100 copies into socket buffers (the
//! copy was 37% of the subscribe server's CPU in `perf` on `bin/bench --only frames-256k`).
//!
//! Invariants:
//! - A file's contents never change once shared: it is written whole, then sealed against
//!   writes, growing and shrinking, so pages a socket still holds cannot change under it.
//! - The table holds an entry exactly as long as the shared `Bytes` lives: the entry is made
//!   with it and removed by its owner's `Drop`, before its memory can be reused, so an address
//!   is never matched to another payload's file. A file costs one descriptor and the payload's
//!   size in page cache for that time, within the outboxes' byte bounds like the payload.
//! - Each thread sends from a file of its own ([`file_of`] makes it at the thread's first send
//!   of the payload): a page's reference count is then written by one core, not bounced
//!   between all of them, and a file costs one copy per worker thread, not one per socket.
//! - Nothing depends on a file: where one cannot be made (no `memfd_create`, a seccomp filter,
//!   [`MAX_FILES`] or [`MAX_FILE_BYTES`] open already) the payload is sent from memory as
//!   before. The caps keep the files from taking the descriptors that connections need, or
//!   more than a bounded amount of page cache, however many large payloads slow subscribers
//!   hold queued.
//!
//! Must not: keep a file past its payload, write to a shared file, or decide who writes.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;

use bytes::Bytes;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Payloads at least this large are worth a file: below it, the file's set-up (three
/// syscalls, a page-cache copy) costs more than the copies it saves.
pub(crate) const MIN_BYTES: usize = 64 * 1024;

/// A payload goes into a file only when it goes to at least this many sockets: the file is
/// one copy, and it saves one per socket.
pub(crate) const MIN_READERS: usize = 4;

/// At most this many files open at once, process-wide.
const MAX_FILES: usize = 256;

/// At most this many bytes in them, process-wide.
const MAX_FILE_BYTES: usize = 64 << 20;

/// The files open now, and the bytes they hold.
static OPEN: Mutex<(usize, usize)> = Mutex::new((0, 0));

/// A sealed memory file holding one payload; counted in [`OPEN`] while it lives.
#[derive(Debug)]
pub(crate) struct PageFile {
    fd: OwnedFd,
    len: usize,
}

impl AsFd for PageFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for PageFile {
    fn drop(&mut self) {
        release(self.len);
    }
}

/// Count a file of `len` bytes in [`OPEN`], if both caps allow it.
fn reserve(len: usize) -> bool {
    let mut open = crate::lock(&OPEN);
    let fits = open.0 < MAX_FILES && open.1 + len <= MAX_FILE_BYTES;
    if fits {
        open.0 += 1;
        open.1 += len;
    }
    fits
}

fn release(len: usize) {
    let mut open = crate::lock(&OPEN);
    open.0 -= 1;
    open.1 -= len;
}

/// Where the payload's table entry is keyed: its address and length.
type Key = (usize, usize);

/// A shared payload's files: one per thread that sent it, made by its first send there.
#[derive(Default)]
struct Files(Mutex<Vec<(ThreadId, Arc<PageFile>)>>);

fn table() -> &'static Mutex<HashMap<Key, Arc<Files>>> {
    static TABLE: OnceLock<Mutex<HashMap<Key, Arc<Files>>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

fn key(payload: &[u8]) -> Key {
    (payload.as_ptr() as usize, payload.len())
}

/// `payload`, the same bytes at the same address, now known to [`file_of`]; `payload` itself
/// when it is smaller than [`MIN_BYTES`] or already known (it, or another handle on the same
/// bytes, was shared: that one's owner keeps the entry).
fn share(payload: Bytes) -> Bytes {
    if payload.len() < MIN_BYTES {
        return payload;
    }
    match crate::lock(table()).entry(key(&payload)) {
        Entry::Occupied(_) => return payload,
        Entry::Vacant(vacant) => vacant.insert(Arc::default()),
    };
    Bytes::from_owner(Shared(payload))
}

/// `frame` with its payload [`share`]d when it is a text or binary frame of at least
/// [`MIN_BYTES`] going to at least [`MIN_READERS`] sockets; else `frame` as it is.
pub(crate) fn share_frame(frame: Message, readers: usize) -> Message {
    if readers < MIN_READERS || frame.len() < MIN_BYTES {
        return frame;
    }
    match frame {
        Message::Binary(payload) => Message::Binary(share(payload)),
        Message::Text(text) => {
            let shared = share(Bytes::from(text.clone()));
            // The same bytes, so valid UTF-8 still; checked again rather than assumed.
            Utf8Bytes::try_from(shared).map_or(Message::Text(text), Message::Text)
        }
        other => other,
    }
}

/// A sealed file holding exactly `payload`, if it was made by [`share`]: the calling thread's
/// own, made now if it has none yet. `None` when no file can be made.
pub(crate) fn file_of(payload: &[u8]) -> Option<Arc<PageFile>> {
    if payload.len() < MIN_BYTES {
        return None;
    }
    let files = crate::lock(table()).get(&key(payload)).cloned()?;
    let me = std::thread::current().id();
    if let Some((_, file)) = crate::lock(&files.0).iter().find(|(id, _)| *id == me) {
        return Some(file.clone());
    }
    // Made without the lock: another thread may be making its own meanwhile.
    match file_with(payload) {
        Ok(file) => {
            let file = Arc::new(file);
            crate::lock(&files.0).push((me, file.clone()));
            Some(file)
        }
        Err(error) => {
            tracing::debug!(%error, "no memory file for a large payload; sent from memory");
            None
        }
    }
}

/// The owner of a shared payload: its drop removes the payload's file from the table.
struct Shared(Bytes);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Before `self.0` is dropped, so before its memory can hold another payload.
        crate::lock(table()).remove(&key(&self.0));
    }
}

/// A new sealed file holding `payload`, within [`MAX_FILES`] and [`MAX_FILE_BYTES`].
fn file_with(payload: &[u8]) -> std::io::Result<PageFile> {
    if !reserve(payload.len()) {
        return Err(std::io::Error::other("the memory files' cap is reached"));
    }
    let file = match new_file() {
        // Counted from here on: dropped on any failure below, it gives its place back.
        Ok(fd) => PageFile {
            fd,
            len: payload.len(),
        },
        Err(error) => {
            release(payload.len());
            return Err(error);
        }
    };
    let mut rest = payload;
    while !rest.is_empty() {
        match rustix::io::write(&file, rest)? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => rest = &rest[n..],
        }
    }
    seal(&file)?;
    Ok(file)
}

/// A new empty memory file that can be sealed.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn new_file() -> std::io::Result<OwnedFd> {
    use rustix::fs::{memfd_create, MemfdFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    Ok(memfd_create("lightrelay-frame", flags)?)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn new_file() -> std::io::Result<OwnedFd> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// No write, growth or shrinking from now on, and no unsealing.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn seal(file: &PageFile) -> std::io::Result<()> {
    use rustix::fs::{fcntl_add_seals, SealFlags};
    let all = SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL;
    Ok(fcntl_add_seals(file, all)?)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn seal(_file: &PageFile) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Bytes {
        Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
    }

    fn read_all(file: &PageFile) -> Vec<u8> {
        let mut out = vec![0; MIN_BYTES * 4];
        let n = rustix::io::pread(file, &mut out, 0).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn a_shared_payload_keeps_its_bytes_and_address_and_its_file_holds_a_sealed_copy() {
        let original = payload(MIN_BYTES + 17);
        let address = original.as_ptr();
        let shared = share(original.clone());
        assert_eq!(shared.as_ptr(), address);
        assert_eq!(shared, original);
        let file = file_of(&shared).expect("a file for a shared payload");
        assert_eq!(read_all(&file), original.to_vec());
        assert!(
            rustix::io::pwrite(&*file, b"x", 0).is_err(),
            "the file is sealed against writes"
        );
        // Clones and the whole-payload slice find it; a part of it is another payload.
        assert!(file_of(&shared.clone()).is_some());
        assert!(file_of(&shared.slice(1..)).is_none());
    }

    #[test]
    fn the_file_is_forgotten_with_the_last_handle_on_its_payload() {
        let shared = share(payload(MIN_BYTES));
        let k = key(&shared);
        let clone = shared.clone();
        drop(shared);
        assert!(crate::lock(table()).contains_key(&k), "a clone still lives");
        drop(clone);
        assert!(!crate::lock(table()).contains_key(&k));
    }

    #[test]
    fn each_thread_sends_from_a_file_of_its_own() {
        let shared = share(payload(MIN_BYTES * 2));
        let here = file_of(&shared).unwrap();
        assert!(
            Arc::ptr_eq(&here, &file_of(&shared).unwrap()),
            "one per thread"
        );
        let there = std::thread::scope(|s| s.spawn(|| file_of(&shared).unwrap()).join()).unwrap();
        assert!(!Arc::ptr_eq(&here, &there));
        assert_eq!(read_all(&there), shared.to_vec());
    }

    /// The files never take more than `MAX_FILES` descriptors or `MAX_FILE_BYTES` bytes;
    /// past either, payloads go from memory, and files closed give their places back.
    /// (nextest runs each test alone.)
    #[test]
    fn files_stop_at_the_caps_and_closed_ones_make_room() {
        let open_before = crate::lock(&OPEN).0;
        let payloads: Vec<Bytes> = (0..MAX_FILES + 10)
            .map(|_| share(payload(MIN_BYTES)))
            .collect();
        let files: Vec<_> = payloads.iter().filter_map(|p| file_of(p)).collect();
        assert_eq!(files.len(), MAX_FILES - open_before);
        assert!(file_of(&payloads[MAX_FILES + 9]).is_none());
        drop(files);
        drop(payloads);
        assert_eq!(crate::lock(&OPEN).0, open_before);

        let huge = share(payload(MAX_FILE_BYTES + 1));
        assert!(
            file_of(&huge).is_none(),
            "more bytes than all files may hold"
        );
        let half = share(payload(MAX_FILE_BYTES / 2));
        let held = file_of(&half).expect("half the bytes fit");
        let other_half = share(payload(MAX_FILE_BYTES / 2 + 1));
        assert!(file_of(&other_half).is_none(), "past the bytes' cap");
        drop(held);
        drop(half);
        assert!(
            file_of(&other_half).is_some(),
            "room made by the file closed"
        );
    }

    /// Shared again (raw, then binary clients of one message), a payload stays as it is: the
    /// first owner keeps the entry, for as long as any handle on it lives.
    #[test]
    fn a_payload_shared_twice_keeps_one_entry_for_its_first_owners_life() {
        let first = share(payload(MIN_BYTES));
        let again = share(first.clone());
        assert!(file_of(&again).is_some());
        drop(first);
        assert!(
            file_of(&again).is_some(),
            "the first owner lives on in `again`"
        );
        let k = key(&again);
        drop(again);
        assert!(!crate::lock(table()).contains_key(&k));
    }

    #[test]
    fn small_or_unshared_payloads_have_no_file() {
        assert!(file_of(&payload(MIN_BYTES)).is_none());
        let few = share_frame(Message::binary(payload(MIN_BYTES)), MIN_READERS - 1);
        assert!(file_of(&few.into_data()).is_none());
        let small = share(payload(MIN_BYTES - 1));
        assert!(file_of(&small).is_none());
        assert!(!crate::lock(table()).contains_key(&key(&small)));
    }
}
