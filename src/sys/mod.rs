//! The one place with `unsafe` (with `kafka.rs`, the consumer's event
//! queue through librdkafka's C API): non-blocking sends on a connection's
//! socket, used by the shard fan-out to write queued frames directly
//! instead of waking each connection's task, either as one `send(2)` or
//! `sendmsg(2)` per socket or as a batch of them in one io_uring submission
//! ([`SendBatch`]) to the sockets slots hold ([`DirectSocket`], which keeps
//! each descriptor open while it is held); non-blocking reads of a plain
//! connection's socket ([`recv_nonblocking`]), taking connections off a
//! listener ([`accept`]) (these socket calls through `libc::syscall`, not
//! glibc's wrappers: [`syscall_result`]), and the readiness watches
//! that say when to read, which parked connections keep ([`PollRing`],
//! with the fd hand-overs parking needs); the
//! kernel's coarse monotonic clock ([`coarse_monotonic_ms`]); and the
//! process's opt-out of transparent huge pages. What each buys is measured
//! in perf/RESULTS.md.

#![allow(unsafe_code)]

pub mod kafka;

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use io_uring::{opcode, types, IoUring};

use crate::stream::Stream;

const SEND_FLAGS: i32 = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
/// `io_uring_enter(2)`: wait for completions (the `io-uring` crate keeps
/// its copy private).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// `CLOCK_MONOTONIC_COARSE` in ms: the time of the last scheduler tick,
/// read from the vDSO without touching the TSC (`Clock::mono_ms`).
pub fn coarse_monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec; the clock exists on every
    // Linux since 2.6.32.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// A connection's stream, shared by its task and its shard slot.
pub type SharedStream = Rc<RefCell<Stream>>;

/// A socket the shard's fan-out may write to directly. Holding one keeps
/// the descriptor it names open: ownership, not the order in which other
/// things are dropped, guarantees that a direct write reaches the
/// connection it was meant for and never a later socket given the same
/// number.
pub enum DirectSocket {
    /// A plain-TCP connection's stream, shared with its task; `fd` is its
    /// descriptor, read when this was made.
    Stream { fd: RawFd, stream: SharedStream },
    /// A descriptor of the slot's own: a parked connection's duplicate.
    Owned(OwnedFd),
}

impl std::fmt::Debug for DirectSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stream { fd, .. } => write!(f, "DirectSocket::Stream({fd})"),
            Self::Owned(fd) => write!(f, "DirectSocket::Owned({})", fd.as_raw_fd()),
        }
    }
}

impl DirectSocket {
    /// The stream's socket, or None for TLS (its bytes are encrypted by
    /// its task, never written directly).
    pub fn shared(stream: &SharedStream) -> Option<Self> {
        match &*stream.borrow() {
            Stream::Plain(tcp) => Some(Self::Stream { fd: tcp.as_raw_fd(), stream: stream.clone() }),
            Stream::Tls(_) => None,
        }
    }

    pub fn owned(fd: OwnedFd) -> Self {
        Self::Owned(fd)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Owned(fd) => fd.as_fd(),
            // SAFETY: `fd` is `stream`'s descriptor. A glommio stream keeps
            // its descriptor open until it is dropped (closing it only shuts
            // the socket down), and `self` holds `stream`, so the descriptor
            // stays open at least as long as the borrow of `self`.
            Self::Stream { fd, .. } => unsafe { BorrowedFd::borrow_raw(*fd) },
        }
    }

    /// The owned descriptor (of a parked connection), if that is what this is.
    pub fn into_owned(self) -> Option<OwnedFd> {
        match self {
            Self::Owned(fd) => Some(fd),
            Self::Stream { .. } => None,
        }
    }
}

/// Sends as much of `buf` as the socket takes now, never blocking and never
/// raising SIGPIPE. `Err(WouldBlock)` when the socket buffer is full.
fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice, valid for reads of `buf.len()` bytes,
    // and the kernel does not keep the pointer. `fd` is open for the call
    // (it is borrowed).
    let n = unsafe {
        let null = std::ptr::null::<libc::sockaddr>();
        libc::syscall(libc::SYS_sendto, fd.as_raw_fd(), buf.as_ptr(), buf.len(), SEND_FLAGS, null, 0 as libc::socklen_t)
    };
    syscall_result(n)
}

/// A raw system call's return value: the count, or the error in `errno`.
///
/// The socket calls here go through `libc::syscall` rather than glibc's
/// `send`/`recv`/`sendmsg`/`accept4`: those are cancellation points, and in
/// a process with more than one thread each call also runs two atomic
/// updates around the system call (`__pthread_enable_asynccancel`, about
/// 35 ns a call here, 1% of a connect storm's CPU). Nothing here cancels
/// threads.
fn syscall_result(n: libc::c_long) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads what the socket holds now into `buf`, never blocking: `Ok(0)`
/// when the peer closed, `Err(WouldBlock)` when nothing is there.
pub fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice, valid for writes of `buf.len()` bytes,
    // and the kernel does not keep the pointer. `fd` is open for the call
    // (it is borrowed).
    let n = unsafe {
        let (null, no_len) = (std::ptr::null_mut::<libc::sockaddr>(), std::ptr::null_mut::<libc::socklen_t>());
        libc::syscall(libc::SYS_recvfrom, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len(), libc::MSG_DONTWAIT, null, no_len)
    };
    syscall_result(n)
}

/// Like [`send_nonblocking`], for `first` followed by `second` in one
/// `sendmsg` (an outbox and the shared price log).
fn sendv_nonblocking(fd: BorrowedFd<'_>, first: &[u8], second: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec { iov_base: first.as_ptr() as *mut _, iov_len: first.len() },
        libc::iovec { iov_base: second.as_ptr() as *mut _, iov_len: second.len() },
    ];
    // SAFETY: both iovecs point into live slices valid for reads of their
    // lengths for the duration of the call; the kernel only reads them
    // (`sendmsg`) and keeps no pointer. `msg` is zero-initialised apart from
    // the iovec array, which outlives the call. `fd` is borrowed, so open.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        libc::syscall(libc::SYS_sendmsg, fd.as_raw_fd(), &msg as *const libc::msghdr, SEND_FLAGS)
    };
    syscall_result(n)
}

/// Non-blocking sends to many sockets at once: one io_uring submission (one
/// `io_uring_enter`) per batch instead of one system call per socket.
///
/// Each send carries `MSG_DONTWAIT`, so the kernel completes it inline
/// during the submission (bytes taken, or `EAGAIN` when the socket is full)
/// and never parks it: the call returns with every result in hand, and no
/// buffer is referenced once it has returned. It saves the per-call
/// entry, exit and mitigation cost of one `send(2)` per socket
/// (`perf/RESULTS.md`). Without a ring (not requested, or the kernel
/// refused one) the same calls are plain `send`/`sendmsg`.
pub struct SendBatch {
    ring: Option<IoUring>,
    /// Per batch entry: the `sendmsg` header and its two-part vector. They
    /// hold pointers only while [`SendBatch::send_all`] runs.
    msgs: Box<[libc::msghdr]>,
    iovs: Box<[[libc::iovec; 2]]>,
    results: Vec<isize>,
}

impl SendBatch {
    /// Sockets per submission.
    pub const BATCH: usize = 64;

    /// A batch writer using io_uring when `use_ring` and the kernel allows
    /// it, plain system calls otherwise.
    pub fn new(use_ring: bool) -> Self {
        let ring = if use_ring {
            match IoUring::new(Self::BATCH as u32) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable for fan-out writes: one system call per socket");
                    None
                }
            }
        } else {
            None
        };
        // SAFETY: `msghdr` and `iovec` are plain C structs for which all
        // zeroes (null pointers, zero lengths) is a valid value.
        let zero_msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let zero_iov = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        Self {
            ring,
            msgs: vec![zero_msg; Self::BATCH].into_boxed_slice(),
            iovs: vec![[zero_iov; 2]; Self::BATCH].into_boxed_slice(),
            results: Vec::with_capacity(Self::BATCH),
        }
    }

    /// Whether sends go through io_uring.
    pub fn uses_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Sends `first` then `second` to each socket, as much as it takes now,
    /// never blocking and never raising SIGPIPE. Returns, in order, the
    /// bytes each socket took or `-errno` (`-EAGAIN` when full). Every
    /// descriptor is borrowed for the call, so it stays open throughout.
    pub fn send_all<'a, I>(&mut self, items: I) -> &[isize]
    where
        I: IntoIterator<Item = (BorrowedFd<'a>, &'a [u8], &'a [u8])>,
    {
        self.results.clear();
        let mut items = items.into_iter().peekable();
        if self.ring.is_none() {
            for (fd, first, second) in items {
                self.results.push(encode(send_two(fd, first, second)));
            }
            return &self.results;
        }
        while items.peek().is_some() {
            let start = self.results.len();
            let mut queued = 0;
            {
                let ring = self.ring.as_mut().expect("checked above");
                let mut sq = ring.submission();
                while queued < Self::BATCH {
                    let Some((fd, first, second)) = items.next() else { break };
                    let entry = if first.is_empty() || second.is_empty() {
                        let buf = if first.is_empty() { second } else { first };
                        opcode::Send::new(types::Fd(fd.as_raw_fd()), buf.as_ptr(), buf.len() as u32)
                            .flags(SEND_FLAGS)
                            .build()
                    } else {
                        let iov = &mut self.iovs[queued];
                        iov[0] = libc::iovec { iov_base: first.as_ptr() as *mut _, iov_len: first.len() };
                        iov[1] = libc::iovec { iov_base: second.as_ptr() as *mut _, iov_len: second.len() };
                        let msg = &mut self.msgs[queued];
                        msg.msg_iov = iov.as_mut_ptr();
                        msg.msg_iovlen = 2;
                        opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), msg as *const libc::msghdr)
                            .flags(SEND_FLAGS as u32)
                            .build()
                    };
                    // SAFETY: the entry's buffers (`first`, `second`, and the
                    // header and vector in `self`) stay valid and unmoved
                    // until its completion is reaped below, before this call
                    // returns: the slices are borrowed for 'a, which outlives
                    // the call, and `self` is exclusively borrowed. The queue
                    // has BATCH free entries (it is drained every round), so
                    // the push cannot fail.
                    unsafe { sq.push(&entry.user_data(queued as u64)).expect("submission queue has room") };
                    self.results.push(-(libc::EAGAIN as isize));
                    queued += 1;
                }
            }
            self.complete(start, queued);
        }
        &self.results
    }

    /// Submits the `queued` entries and records each completion's result
    /// at `start + user_data`. Returns only once every entry the kernel
    /// took has completed: until then it may still read the buffers, which
    /// the caller reuses as soon as this returns.
    fn complete(&mut self, start: usize, queued: usize) {
        let ring = self.ring.as_mut().expect("only called with a ring");
        let mut reaped = 0;
        while reaped < queued {
            let failure = match ring.submit_and_wait(queued - reaped) {
                Ok(_) => None,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => None,
                Err(e) => Some(e),
            };
            for cqe in ring.completion() {
                self.results[start + cqe.user_data() as usize] = cqe.result() as isize;
                reaped += 1;
            }
            let Some(e) = failure else { continue };
            // Not expected with these opcodes. Entries still in the
            // submission queue were never taken and never will be (the ring
            // is dropped below); the ones taken must finish first.
            let taken = queued - ring.submission().len();
            let mut waits = 0;
            while reaped < taken && waits < 3 {
                waits += 1;
                // SAFETY: submits nothing (`to_submit` 0) and only waits for
                // completions of entries the kernel already took.
                let _ = unsafe {
                    ring.submitter().enter::<libc::sigset_t>(0, (taken - reaped) as u32, IORING_ENTER_GETEVENTS, None)
                };
                for cqe in ring.completion() {
                    self.results[start + cqe.user_data() as usize] = cqe.result() as isize;
                    reaped += 1;
                }
            }
            // Entries without a result keep the EAGAIN set when queued:
            // nothing of theirs was written, and their drivers finish them.
            tracing::error!(
                error = %e,
                taken,
                completed = reaped,
                "io_uring submission failed: fan-out writes fall back to system calls"
            );
            self.ring = None;
            return;
        }
    }
}

/// A send's outcome as bytes taken (>= 0) or `-errno`.
fn encode(r: io::Result<usize>) -> isize {
    match r {
        Ok(n) => n as isize,
        Err(e) => -(e.raw_os_error().unwrap_or(libc::EIO) as isize),
    }
}

fn send_two(fd: BorrowedFd<'_>, first: &[u8], second: &[u8]) -> io::Result<usize> {
    match (first.is_empty(), second.is_empty()) {
        (false, true) => send_nonblocking(fd, first),
        (true, _) => send_nonblocking(fd, second),
        _ => sendv_nonblocking(fd, first, second),
    }
}

/// An io_uring instance that only watches sockets for readability: each
/// plain-TCP connection's socket has one multishot `POLL_ADD` on its
/// shard's ring, armed once and kept through parking (a parked connection
/// has no task, only the watch). Each completion also signals an eventfd,
/// which the shard's parker task waits on through glommio (glommio has no
/// public way to wait on an arbitrary fd, but it can read a file, and a
/// read of an eventfd completes when it is signalled). Submissions are
/// queued and go to the kernel together ([`PollRing::submit`]), one system
/// call for every watch a pass of the executor armed or withdrew.
pub struct PollRing {
    ring: IoUring,
}

impl PollRing {
    /// The ring, and the eventfd it signals as a glommio file to read.
    /// Must run on a glommio executor (the file belongs to its reactor).
    pub fn new(entries: u32) -> io::Result<(Self, glommio::io::BufferedFile)> {
        // Completions raised from another CPU wait for this thread's next
        // kernel entry instead of interrupting it with an IPI (as glommio's
        // own rings, see vendor/glommio/PATCHED.md); kernels before 5.19
        // refuse the flag.
        let mut builder = IoUring::builder();
        builder.setup_cqsize(entries.saturating_mul(8));
        let ring = match builder.clone().setup_coop_taskrun().build(entries) {
            Ok(ring) => ring,
            Err(_) => builder.build(entries)?,
        };
        // SAFETY: eventfd takes no pointers; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` was just created and is owned by nothing else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // SAFETY: ownership of the eventfd passes to the file, which closes
        // it; the ring's registration holds its own reference.
        let file = unsafe { glommio::io::BufferedFile::from_raw_fd(efd.into_raw_fd()) };
        Ok((Self { ring }, file))
    }

    /// Watches `fd` until [`PollRing::poll_remove`] (the watch holds the
    /// socket open meanwhile): a completion carrying `user_data` each time
    /// it becomes readable, hangs up or fails. A completion without
    /// [`Completion::more`] ends the watch (the kernel ends one whose
    /// completion found the queue full). Queued: see [`PollRing::submit`].
    pub fn poll_add(&mut self, fd: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        let mask = (libc::POLLIN | libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32;
        let entry = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), mask).multi(true).build().user_data(user_data);
        self.push(entry)
    }

    /// Watches `fd` until it is next readable, hung up or in error (one
    /// completion, carrying `user_data`); submitted at once.
    pub fn poll_once(&mut self, fd: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        let mask = (libc::POLLIN | libc::POLLERR | libc::POLLHUP) as u32;
        self.push(opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), mask).build().user_data(user_data))?;
        self.submit()
    }

    /// Withdraws the watch added with `user_data` (the kernel then drops
    /// its reference to the socket). Its completion, and the withdrawn
    /// watch's last, carry [`PollRing::REMOVED`] and `-ECANCELED`
    /// respectively. Queued: see [`PollRing::submit`].
    pub fn poll_remove(&mut self, user_data: u64) -> io::Result<()> {
        let entry = opcode::PollRemove::new(user_data).build().user_data(Self::REMOVED);
        self.push(entry)
    }

    /// The user data of a withdrawal's own completion.
    pub const REMOVED: u64 = u64::MAX;

    /// Queues `entry`, submitting what is queued first when the queue is
    /// full.
    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: poll entries reference no memory of ours (the fd is
        // resolved when the entry is submitted).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        Ok(())
    }

    /// Whether entries are queued but not yet submitted.
    pub fn has_queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Hands every queued entry to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Takes every completion posted so far, including any the kernel held
    /// back while the completion queue was full (an enter flushes those;
    /// they would not signal the eventfd).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        loop {
            out.extend(self.ring.completion().map(|c| Completion {
                user_data: c.user_data(),
                result: c.result(),
                more: io_uring::cqueue::more(c.flags()),
            }));
            if !self.ring.submission().cq_overflow() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "poll ring: flushing held-back completions failed");
                return;
            }
        }
    }
}

/// One completion of a [`PollRing`].
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    /// The poll mask, or a negative errno.
    pub result: i32,
    /// The watch goes on (`IORING_CQE_F_MORE`); false on its last.
    pub more: bool,
}

/// Takes one pending connection off a non-blocking listener, with its
/// peer's address: `accept4` with close-on-exec, as socket2's `accept`
/// does, but as a raw system call (see [`syscall_result`]).
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(socket2::Socket, socket2::SockAddr)> {
    // SAFETY: try_init hands the closure zeroed address storage and its
    // length, valid for the call; accept4 writes at most that length.
    let (fd, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let n = libc::syscall(libc::SYS_accept4, listener.as_raw_fd(), storage, len, libc::SOCK_CLOEXEC);
            syscall_result(n).map(|fd| fd as RawFd)
        })?
    };
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok((unsafe { socket2::Socket::from_raw_fd(fd) }, addr))
}

/// A glommio listener over a bound, listening, blocking socket.
pub fn glommio_listener(fd: OwnedFd) -> glommio::net::TcpListener {
    // SAFETY: `fd` is an open listening socket whose ownership passes to
    // the listener.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// The descriptor of a glommio stream, borrowed with it.
pub fn tcp_fd(tcp: &glommio::net::TcpStream) -> BorrowedFd<'_> {
    // SAFETY: a glommio stream keeps its descriptor open until it is
    // dropped, and the borrow cannot outlive `tcp`.
    unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) }
}

/// A glommio stream over a socket this process owns.
pub fn tcp_stream(fd: OwnedFd) -> glommio::net::TcpStream {
    // SAFETY: `fd` is an open socket whose ownership passes to the stream.
    unsafe { glommio::net::TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// Asks the allocator to hand this thread's free pages back to the
/// kernel now (`mi_collect`). mimalloc returns a page only when the thread
/// allocates or frees again after it has been empty for a while; a shard
/// that parks thousands of connections and then goes quiet would keep the
/// memory their tasks used. Forced (`true`): pages of every size class
/// and abandoned segments too (what each mode keeps: `perf/RESULTS.md`).
pub fn release_free_memory() {
    // SAFETY: mi_collect takes a plain bool; mimalloc synchronises its own
    // shared state (abandoned segments) internally.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Opts the process out of transparent huge pages (`PR_SET_THP_DISABLE`).
///
/// The allocator asks for huge pages on its arenas; each first touch then
/// zeroes 2 MiB, and a partly used huge page counts whole in RSS: with
/// many small idle connections that is most of their memory. The same
/// advice servers such as Redis give for latency-sensitive processes.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches
    // no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
