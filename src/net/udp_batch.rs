//! Batched UDP receive and send, for the greylisting server and its load generator.
//!
//! One request/reply round trip per datagram costs two syscalls, which caps a
//! core at a few hundred thousand datagrams per second. To reach a million
//! decisions per second on two cores each worker thread owns its own
//! `SO_REUSEPORT` socket (so the kernel spreads load without a shared lock)
//! and moves up to `batch` datagrams per `recvmmsg`/`sendmmsg` call.
//!
//! Everything here is safe Rust: the raw `mmsghdr` handling lives in `nix`.
//! On targets without `recvmmsg` the same API falls back to one datagram per
//! syscall, so the server still works there, only slower.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, getsockopt, recvmsg, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags,
    SockFlag, SockProtocol, SockType, SockaddrStorage,
};
#[cfg(target_os = "linux")]
use nix::sys::socket::{recvmmsg, sendmmsg, ControlMessage, MultiHeaders};

/// The kernel silently caps `recvmmsg`/`sendmmsg` at `UIO_MAXIOV` messages,
/// so a larger batch would only waste buffer memory.
const MAX_BATCH: usize = 1024;

/// No UDP payload exceeds 65,535 bytes (the length field is 16 bits), so a
/// larger slot would never be filled.
const MAX_DATAGRAM: usize = 65_535;

/// How often one reply may be interrupted by a signal before it is dropped;
/// bounded so that a signal storm cannot keep `send` looping.
const MAX_INTERRUPTS: u32 = 8;

/// Binds `n` UDP sockets to the same address with SO_REUSEPORT (and
/// SO_REUSEADDR), so the kernel spreads datagrams over them; receive buffer
/// raised to `recv_buffer` bytes (best effort: ignore failure), read timeout
/// `timeout`. If addr has port 0, the first socket is bound to port 0 and the
/// others to the port it got. Returns the sockets (std::net::UdpSocket) — they
/// are handed to worker threads.
///
/// The write timeout is set to `timeout` as well, so that
/// [`BatchSocket::send`] never blocks longer than that on a full send buffer.
/// The receive buffer is only ever raised, never lowered below the system
/// default. `n == 0` and a zero `timeout` are refused with `InvalidInput`.
pub fn bind_reuseport(
    addr: SocketAddr,
    n: usize,
    recv_buffer: usize,
    timeout: Duration,
) -> io::Result<Vec<UdpSocket>> {
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bind_reuseport needs at least one socket",
        ));
    }
    let mut sockets = Vec::with_capacity(n);
    let mut target = addr;
    for _ in 0..n {
        let sock = bind_one(target, recv_buffer, timeout)?;
        if target.port() == 0 {
            // Every later socket must join the same reuseport group, which
            // means the very port the kernel picked for the first one.
            target.set_port(sock.local_addr()?.port());
        }
        sockets.push(sock);
    }
    Ok(sockets)
}

/// Creates, configures and binds one member of the reuseport group.
fn bind_one(addr: SocketAddr, recv_buffer: usize, timeout: Duration) -> io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket(family, SockType::Datagram, cloexec(), SockProtocol::Udp)?;
    // Both options must be set before bind: SO_REUSEPORT is what lets the
    // sockets share the port, SO_REUSEADDR lets a restarted server rebind
    // at once.
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    raise_recv_buffer(&fd, recv_buffer);
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    let sock = UdpSocket::from(fd);
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    Ok(sock)
}

/// Close-on-exec, as std's own sockets are, so that a spawned helper process
/// cannot keep the server's port open.
fn cloexec() -> SockFlag {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = SockFlag::SOCK_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = SockFlag::empty();
    flags
}

/// Raises SO_RCVBUF to at least `wanted` bytes. A burst of datagrams that
/// arrives while a worker is busy deciding waits here; a small buffer means
/// drops. Failures are ignored: the server works, only less burst-tolerant.
fn raise_recv_buffer(fd: &OwnedFd, wanted: usize) {
    if getsockopt(fd, sockopt::RcvBuf).is_ok_and(|current| current >= wanted) {
        // Never lower a buffer the system already made larger.
        return;
    }
    // SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN;
    // without it the plain option still gets as close as rmem_max allows.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if setsockopt(fd, sockopt::RcvBufForce, &wanted).is_ok() {
        return;
    }
    let _ = setsockopt(fd, sockopt::RcvBuf, &wanted);
}

/// What the last `recv` learnt about one datagram; its bytes stay in the
/// shared buffer.
#[derive(Clone, Copy, Debug)]
struct Received {
    len: usize,
    from: SocketAddr,
    truncated: bool,
}

/// One worker's batched socket: preallocated buffers for `batch` datagrams of
/// at most `max_datagram` bytes each.
///
/// It is deliberately not `Send`: the `mmsghdr` array it reuses holds raw
/// pointers. Hand the `UdpSocket` from [`bind_reuseport`] to the worker
/// thread and build the `BatchSocket` there.
pub struct BatchSocket {
    sock: UdpSocket,
    batch: usize,
    max_datagram: usize,
    /// `batch` slots of `max_datagram` bytes, slot `i` for datagram `i`.
    buf: Vec<u8>,
    /// Datagrams of the last `recv`, in arrival order.
    received: Vec<Received>,
    /// Destinations of the `sendmmsg` chunk in flight; kept to reuse its
    /// allocation.
    #[cfg(target_os = "linux")]
    send_addrs: Vec<Option<SockaddrStorage>>,
    /// Separate header arrays for receive and send: `sendmmsg` points each
    /// header's name at `send_addrs`, which `recvmmsg` must never write to,
    /// and the kernel leaves the address length of the last receive in each
    /// receive header, which is only right for the next receive on the same
    /// socket (whose family never changes).
    #[cfg(target_os = "linux")]
    recv_headers: MultiHeaders<SockaddrStorage>,
    /// Headers for `sendmmsg`, see `recv_headers`.
    #[cfg(target_os = "linux")]
    send_headers: MultiHeaders<SockaddrStorage>,
    /// Whether to use the batched syscalls; the tests turn it off to run the
    /// one-at-a-time fallback on Linux too.
    #[cfg(target_os = "linux")]
    batched: bool,
}

impl BatchSocket {
    /// Wraps `sock`, allocating buffers for `batch` datagrams of at most
    /// `max_datagram` bytes each. `batch` is clamped to 1..=1024 (the
    /// kernel's per-call limit) and `max_datagram` to 1..=65535 (the largest
    /// UDP payload).
    pub fn new(sock: UdpSocket, batch: usize, max_datagram: usize) -> Self {
        let batch = batch.clamp(1, MAX_BATCH);
        let max_datagram = max_datagram.clamp(1, MAX_DATAGRAM);
        BatchSocket {
            sock,
            batch,
            max_datagram,
            buf: vec![0; batch * max_datagram],
            received: Vec::with_capacity(batch),
            #[cfg(target_os = "linux")]
            send_addrs: Vec::with_capacity(batch),
            #[cfg(target_os = "linux")]
            recv_headers: MultiHeaders::preallocate(batch, None),
            #[cfg(target_os = "linux")]
            send_headers: MultiHeaders::preallocate(batch, None),
            #[cfg(target_os = "linux")]
            batched: true,
        }
    }

    /// Waits (up to the socket's read timeout) for at least one datagram,
    /// then takes up to `batch` in one recvmmsg call (MSG_WAITFORONE
    /// semantics: return as soon as at least one arrived, take what else is
    /// queued without waiting). Returns how many were received; Ok(0) on
    /// timeout (WouldBlock/TimedOut/EINTR map to Ok(0)). A datagram larger
    /// than max_datagram is truncated by the kernel: report it via
    /// `truncated(i)` so the caller can refuse it.
    ///
    /// ECONNREFUSED (a pending ICMP error, only ever reported on connected
    /// sockets) also maps to Ok(0): the call consumed it and the socket is
    /// still usable.
    pub fn recv(&mut self) -> io::Result<usize> {
        self.received.clear();
        match self.recv_some() {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN | Errno::ETIMEDOUT | Errno::EINTR | Errno::ECONNREFUSED) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// The i-th datagram received by the last recv: its bytes and sender.
    ///
    /// Panics if `i` is not below the count the last `recv` returned.
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        let r = &self.received[i];
        let start = i * self.max_datagram;
        (&self.buf[start..start + r.len], r.from)
    }

    /// Whether the i-th datagram was truncated (MSG_TRUNC in its flags).
    ///
    /// Panics if `i` is not below the count the last `recv` returned.
    pub fn truncated(&self, i: usize) -> bool {
        self.received[i].truncated
    }

    /// Sends many replies in as few sendmmsg calls as possible; returns how
    /// many were sent. A reply that fails (e.g. ECONNREFUSED from an earlier
    /// ICMP, EAGAIN on a full buffer) is skipped rather than retried forever:
    /// UDP replies are best effort and the client retries. Never blocks
    /// longer than the socket's write timeout.
    ///
    /// Once the send buffer stayed full for a whole write timeout (EAGAIN),
    /// the remaining replies are dropped too, as each would wait as long
    /// again. Errors that concern one destination (refused, unreachable,
    /// port 0, too long, ...) drop only that reply. Only errors that mean the
    /// socket itself is unusable (EBADF, ENOTSOCK, EFAULT) are returned.
    pub fn send(&mut self, replies: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
        let mut sent = 0;
        let mut next = 0;
        let mut interrupts = 0;
        // After a short count the kernel swallowed the error that stopped the
        // batch. If it was a send buffer that stayed full for a whole write
        // timeout, a blocking retry would wait that long again, so the retry
        // must not wait: it either reports the per-destination error at once
        // or EAGAIN, which ends the call.
        let mut dont_wait = false;
        while next < replies.len() {
            let end = replies.len().min(next + self.batch);
            let flags = if dont_wait {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            match self.send_some(&replies[next..end], flags) {
                Ok(n) => {
                    sent += n;
                    dont_wait = n < end - next;
                    // The kernel reports an error rather than 0 when the first
                    // message fails; advancing anyway guarantees progress.
                    next += n.max(1);
                    interrupts = 0;
                }
                Err(Errno::EINTR) if interrupts < MAX_INTERRUPTS => interrupts += 1,
                Err(Errno::EAGAIN | Errno::ETIMEDOUT) => break,
                Err(e @ (Errno::EBADF | Errno::ENOTSOCK | Errno::EFAULT)) => return Err(e.into()),
                Err(_) => {
                    // The failing reply is the first of the chunk: everything
                    // before it was sent by the previous call.
                    next += 1;
                    dont_wait = false;
                    interrupts = 0;
                }
            }
        }
        Ok(sent)
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// One receive syscall, filling `self.received`.
    fn recv_some(&mut self) -> nix::Result<usize> {
        #[cfg(target_os = "linux")]
        if self.batched {
            return self.recv_batch();
        }
        self.recv_single()
    }

    /// One send syscall for a prefix of `replies`; returns how many went out.
    fn send_some(
        &mut self,
        replies: &[(SocketAddr, &[u8])],
        flags: MsgFlags,
    ) -> nix::Result<usize> {
        #[cfg(target_os = "linux")]
        if self.batched {
            return self.send_batch(replies, flags);
        }
        self.send_single(replies, flags)
    }

    #[cfg(target_os = "linux")]
    fn recv_batch(&mut self) -> nix::Result<usize> {
        let fd = self.sock.as_raw_fd();
        // The IoSliceMut views borrow `buf` for exactly as long as the
        // results borrow the headers, so they are rebuilt per call; that is
        // one small allocation against a syscall moving up to `batch`
        // datagrams.
        let mut slots: Vec<[IoSliceMut<'_>; 1]> = self
            .buf
            .chunks_mut(self.max_datagram)
            .map(|slot| [IoSliceMut::new(slot)])
            .collect();
        // The socket's own blocking mode and SO_RCVTIMEO bound the wait for
        // the first datagram; MSG_WAITFORONE makes the rest non-blocking.
        // recvmmsg's own timeout argument is not used: it is only checked
        // after each datagram and can block forever.
        let results = recvmmsg(
            fd,
            &mut self.recv_headers,
            slots.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )?;
        for msg in results {
            self.received.push(Received {
                len: msg.bytes,
                from: to_std(msg.address),
                truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
            });
        }
        Ok(self.received.len())
    }

    #[cfg(target_os = "linux")]
    fn send_batch(
        &mut self,
        replies: &[(SocketAddr, &[u8])],
        flags: MsgFlags,
    ) -> nix::Result<usize> {
        let fd = self.sock.as_raw_fd();
        self.send_addrs.clear();
        self.send_addrs.extend(
            replies
                .iter()
                .map(|(to, _)| Some(SockaddrStorage::from(*to))),
        );
        let slices: Vec<[io::IoSlice<'_>; 1]> = replies
            .iter()
            .map(|(_, bytes)| [io::IoSlice::new(bytes)])
            .collect();
        let no_cmsgs: [ControlMessage<'_>; 0] = [];
        let results = sendmmsg(
            fd,
            &mut self.send_headers,
            &slices,
            &self.send_addrs,
            no_cmsgs,
            flags,
        )?;
        // nix exposes the sent count only through the result iterator.
        Ok(results.count())
    }

    /// Fallback without recvmmsg: one datagram per call, with recvmsg so
    /// that truncation is still reported.
    #[cfg_attr(all(target_os = "linux", not(test)), allow(dead_code))]
    fn recv_single(&mut self) -> nix::Result<usize> {
        let fd = self.sock.as_raw_fd();
        let mut slot = [IoSliceMut::new(&mut self.buf[..self.max_datagram])];
        let msg = recvmsg::<SockaddrStorage>(fd, &mut slot, None, MsgFlags::empty())?;
        self.received.push(Received {
            len: msg.bytes,
            from: to_std(msg.address),
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        });
        Ok(1)
    }

    /// Fallback without sendmmsg: sends only the first reply.
    #[cfg_attr(all(target_os = "linux", not(test)), allow(dead_code))]
    fn send_single(
        &mut self,
        replies: &[(SocketAddr, &[u8])],
        flags: MsgFlags,
    ) -> nix::Result<usize> {
        let Some((to, bytes)) = replies.first() else {
            return Ok(0);
        };
        sendto(
            self.sock.as_raw_fd(),
            bytes,
            &SockaddrStorage::from(*to),
            flags,
        )?;
        Ok(1)
    }
}

impl fmt::Debug for BatchSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchSocket")
            .field("local_addr", &self.sock.local_addr().ok())
            .field("batch", &self.batch)
            .field("max_datagram", &self.max_datagram)
            .field("received", &self.received.len())
            .finish()
    }
}

/// Converts a sender address as the kernel reported it. An IPv4 or IPv6
/// socket only ever reports its own family; should anything else appear, the
/// unspecified address with port 0 stands in, and a reply to it fails and is
/// skipped by `send`.
fn to_std(addr: Option<SockaddrStorage>) -> SocketAddr {
    if let Some(ss) = addr {
        if let Some(v4) = ss.as_sockaddr_in() {
            return SocketAddr::V4(SocketAddrV4::from(*v4));
        }
        if let Some(v6) = ss.as_sockaddr_in6() {
            return SocketAddr::V6(SocketAddrV6::from(*v6));
        }
    }
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv6Addr};
    use std::time::Instant;

    const TIMEOUT: Duration = Duration::from_millis(50);
    const LOCAL_V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    const LOCAL_V6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);

    /// A client socket on `like`'s family that gives up after a second, so a
    /// lost datagram fails the test instead of hanging it.
    fn client(like: SocketAddr) -> UdpSocket {
        let any = SocketAddr::new(like.ip(), 0);
        let c = UdpSocket::bind(any).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        c
    }

    fn server(addr: SocketAddr, batch: usize, max_datagram: usize, batched: bool) -> BatchSocket {
        let sock = bind_reuseport(addr, 1, 1 << 20, TIMEOUT).unwrap().remove(0);
        #[allow(unused_mut)]
        let mut bs = BatchSocket::new(sock, batch, max_datagram);
        #[cfg(target_os = "linux")]
        {
            bs.batched = batched;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = batched;
        bs
    }

    /// Whether this machine has ::1 configured at all.
    fn v6_available() -> bool {
        UdpSocket::bind(LOCAL_V6).is_ok()
    }

    /// Datagram `i` of the ordering test: its own length (i + 1) and bytes.
    fn payload(i: usize) -> Vec<u8> {
        (0..=i).map(|k| (i * 7 + k) as u8).collect()
    }

    /// Returns how many sockets it checked.
    fn check_bind(addr: SocketAddr) -> usize {
        let socks = bind_reuseport(addr, 4, 1 << 20, TIMEOUT).unwrap();
        assert_eq!(socks.len(), 4);
        let port = socks[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for s in &socks {
            assert_eq!(s.local_addr().unwrap(), SocketAddr::new(addr.ip(), port));
            // The kernel keeps timeouts in timer ticks (HZ >= 100), so the
            // value read back may be rounded up by up to 10 ms.
            for t in [s.read_timeout().unwrap(), s.write_timeout().unwrap()] {
                let t = t.expect("timeout set");
                assert!(
                    t >= TIMEOUT && t <= TIMEOUT + Duration::from_millis(10),
                    "{t:?}"
                );
            }
        }
        // An explicit port joins the same group: this is the non-zero-port path.
        let more = bind_reuseport(SocketAddr::new(addr.ip(), port), 2, 1 << 20, TIMEOUT).unwrap();
        assert_eq!(more.len(), 2);
        for s in &more {
            assert_eq!(s.local_addr().unwrap().port(), port);
        }
        socks.len() + more.len()
    }

    #[test]
    fn bind_reuseport_gives_n_sockets_on_one_port_v4_and_v6() {
        let v4_checked = check_bind(LOCAL_V4);
        assert_eq!(v4_checked, 6);
        if v6_available() {
            assert_eq!(check_bind(LOCAL_V6), 6);
        } else {
            eprintln!("::1 not configured: IPv6 bind check skipped, IPv4 checked {v4_checked}");
        }
    }

    #[test]
    fn bind_reuseport_refuses_zero_sockets() {
        let err = bind_reuseport(LOCAL_V4, 0, 0, TIMEOUT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn bind_reuseport_raises_receive_buffer() {
        let wanted = 4 << 20;
        let sock = bind_reuseport(LOCAL_V4, 1, wanted, TIMEOUT)
            .unwrap()
            .remove(0);
        let got = getsockopt(&sock, sockopt::RcvBuf).unwrap();
        // With CAP_NET_ADMIN the forced value applies; without it the kernel
        // caps at rmem_max. Either way it doubles what was set.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(wanted);
        assert!(
            got >= wanted.min(cap),
            "SO_RCVBUF {got} below {}",
            wanted.min(cap)
        );
    }

    #[test]
    fn kernel_spreads_datagrams_over_the_group() {
        let socks = bind_reuseport(LOCAL_V4, 4, 1 << 20, TIMEOUT).unwrap();
        let target = socks[0].local_addr().unwrap();
        let mut servers: Vec<BatchSocket> = socks
            .into_iter()
            .map(|s| BatchSocket::new(s, 64, 64))
            .collect();
        // Reuseport picks the socket by hashing the 4-tuple, so 32 clients
        // with distinct source ports land on more than one socket unless the
        // hash is degenerate (probability 4 * 4^-32).
        for i in 0..32u8 {
            client(target).send_to(&[i], target).unwrap();
        }
        let mut seen = Vec::new();
        let mut used = 0;
        for s in &mut servers {
            let mut got = 0;
            loop {
                let n = s.recv().unwrap();
                if n == 0 {
                    break;
                }
                got += n;
                for i in 0..n {
                    seen.push(s.datagram(i).0[0]);
                }
            }
            if got > 0 {
                used += 1;
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..32u8).collect::<Vec<_>>());
        assert!(used >= 2, "all 32 flows hashed to one socket");
    }

    fn check_batches_in_order(addr: SocketAddr, batched: bool) {
        let mut bs = server(addr, 8, 64, batched);
        let target = bs.local_addr().unwrap();
        let c = client(target);
        let from = c.local_addr().unwrap();
        for i in 0..20 {
            c.send_to(&payload(i), target).unwrap();
        }
        // Loopback delivery normally completes inside send_to; the pause
        // covers a deferred softirq so that all 20 are queued.
        std::thread::sleep(Duration::from_millis(20));
        let per_call = if batched { 8 } else { 1 };
        let mut next = 0;
        let mut calls = Vec::new();
        while next < 20 {
            let n = bs.recv().unwrap();
            assert!(n > 0, "datagram {next} lost");
            calls.push(n);
            for i in 0..n {
                let (bytes, sender) = bs.datagram(i);
                assert_eq!(bytes, payload(next).as_slice(), "datagram {next}");
                assert_eq!(sender, from);
                assert!(!bs.truncated(i));
                next += 1;
            }
        }
        if batched {
            assert_eq!(calls, vec![8, 8, 4]);
        } else {
            assert_eq!(calls, vec![per_call; 20]);
        }
        assert_eq!(bs.recv().unwrap(), 0);
    }

    #[test]
    fn recv_takes_a_batch_in_order_v4() {
        check_batches_in_order(LOCAL_V4, true);
    }

    #[test]
    fn recv_takes_a_batch_in_order_v6() {
        if !v6_available() {
            eprintln!("::1 not configured: IPv6 batch check skipped");
            return;
        }
        check_batches_in_order(LOCAL_V6, true);
    }

    #[test]
    fn fallback_receives_one_at_a_time_in_order() {
        check_batches_in_order(LOCAL_V4, false);
    }

    fn check_send_to_two_clients(addr: SocketAddr, batched: bool) {
        // Batch 3 forces the 7 replies into three sendmmsg calls.
        let mut bs = server(addr, 3, 64, batched);
        let a = client(addr);
        let b = client(addr);
        let (ta, tb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let replies: Vec<(SocketAddr, &[u8])> = vec![
            (ta, b"a0"),
            (tb, b"b0 longer"),
            (ta, b"a1"),
            (ta, b""),
            (tb, b"b1"),
            (ta, b"a3 last"),
            (tb, b"b2"),
        ];
        assert_eq!(bs.send(&replies).unwrap(), 7);
        let from = bs.local_addr().unwrap();
        let drain = |c: &UdpSocket, want: &[&[u8]]| {
            let mut buf = [0u8; 64];
            for w in want {
                let (n, sender) = c.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], *w);
                assert_eq!(sender, from);
            }
            c.set_read_timeout(Some(TIMEOUT)).unwrap();
            assert!(c.recv_from(&mut buf).is_err(), "unexpected extra reply");
        };
        drain(&a, &[b"a0", b"a1", b"", b"a3 last"]);
        drain(&b, &[b"b0 longer", b"b1", b"b2"]);
    }

    #[test]
    fn send_reaches_each_client_exactly_v4() {
        check_send_to_two_clients(LOCAL_V4, true);
    }

    #[test]
    fn send_reaches_each_client_exactly_v6() {
        if !v6_available() {
            eprintln!("::1 not configured: IPv6 send check skipped");
            return;
        }
        check_send_to_two_clients(LOCAL_V6, true);
    }

    #[test]
    fn fallback_sends_each_reply() {
        check_send_to_two_clients(LOCAL_V4, false);
    }

    #[test]
    fn send_of_nothing_sends_nothing() {
        let mut bs = server(LOCAL_V4, 8, 64, true);
        assert_eq!(bs.send(&[]).unwrap(), 0);
    }

    #[test]
    fn recv_times_out_with_zero() {
        let mut bs = server(LOCAL_V4, 8, 64, true);
        let start = Instant::now();
        assert_eq!(bs.recv().unwrap(), 0);
        let waited = start.elapsed();
        // SO_RCVTIMEO is rounded to the timer tick, so allow a little early.
        assert!(
            waited >= Duration::from_millis(40),
            "returned after {waited:?}"
        );
        assert!(waited < Duration::from_secs(1), "returned after {waited:?}");
    }

    fn check_truncation(batched: bool) {
        let mut bs = server(LOCAL_V4, 8, 16, batched);
        let target = bs.local_addr().unwrap();
        let c = client(target);
        let long: Vec<u8> = (0..40).collect();
        let exact: Vec<u8> = (100..116).collect();
        c.send_to(&long, target).unwrap();
        c.send_to(&exact, target).unwrap();
        c.send_to(b"ok", target).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = bs.recv().unwrap();
            assert!(n > 0, "datagram lost");
            for i in 0..n {
                got.push((bs.datagram(i).0.to_vec(), bs.truncated(i)));
            }
        }
        assert_eq!(
            got,
            vec![
                ((0..16).collect::<Vec<u8>>(), true),
                (exact, false),
                (b"ok".to_vec(), false),
            ]
        );
    }

    #[test]
    fn oversized_datagram_is_reported_truncated() {
        check_truncation(true);
    }

    #[test]
    fn fallback_reports_truncation() {
        check_truncation(false);
    }

    fn check_failed_replies_are_skipped(batched: bool) {
        let mut bs = server(LOCAL_V4, 8, 64, batched);
        let target = bs.local_addr().unwrap();
        let live = client(target);
        let to_live = live.local_addr().unwrap();
        let closed = {
            let gone = UdpSocket::bind(LOCAL_V4).unwrap();
            gone.local_addr().unwrap()
        };
        // Port 0 and an over-long reply fail in the kernel (EINVAL,
        // EMSGSIZE) for that one message; the closed port fails only later,
        // by ICMP, which Linux reports to connected sockets only.
        let port_zero = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let too_long = vec![0u8; 70_000];
        let replies: Vec<(SocketAddr, &[u8])> = vec![
            (closed, b"x1"),
            (to_live, b"r1"),
            (port_zero, b"x2"),
            (closed, b"x3"),
            (to_live, b"r2"),
            (to_live, &too_long),
            (port_zero, b"x4"),
            (to_live, b"r3"),
        ];
        let start = Instant::now();
        let sent = bs.send(&replies).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        // The two to the closed port leave the host; the three failures do not.
        assert_eq!(sent, 5);
        let mut buf = [0u8; 64];
        for want in [&b"r1"[..], b"r2", b"r3"] {
            let (n, _) = live.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
        }
        // The ICMP errors from the closed port have arrived by now; the socket
        // still receives and sends normally.
        std::thread::sleep(Duration::from_millis(20));
        live.send_to(b"again", target).unwrap();
        assert_eq!(bs.recv().unwrap(), 1);
        assert_eq!(bs.datagram(0), (&b"again"[..], to_live));
        assert_eq!(bs.send(&[(to_live, b"r4")]).unwrap(), 1);
        let (n, _) = live.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"r4");
    }

    #[test]
    fn failed_replies_are_skipped_not_fatal() {
        check_failed_replies_are_skipped(true);
    }

    #[test]
    fn fallback_skips_failed_replies() {
        check_failed_replies_are_skipped(false);
    }

    #[test]
    fn echo_round_trip_reuses_buffers_across_calls() {
        let mut bs = server(LOCAL_V4, 4, 32, true);
        let target = bs.local_addr().unwrap();
        let c = client(target);
        let mut buf = [0u8; 32];
        let mut echoed = HashSet::new();
        for round in 0..3u8 {
            for k in 0..4u8 {
                c.send_to(&[round, k], target).unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
            let n = bs.recv().unwrap();
            assert_eq!(n, 4);
            let replies: Vec<(SocketAddr, Vec<u8>)> = (0..n)
                .map(|i| {
                    let (bytes, from) = bs.datagram(i);
                    (from, bytes.to_vec())
                })
                .collect();
            let refs: Vec<(SocketAddr, &[u8])> =
                replies.iter().map(|(a, b)| (*a, b.as_slice())).collect();
            assert_eq!(bs.send(&refs).unwrap(), 4);
            for _ in 0..4 {
                let (len, _) = c.recv_from(&mut buf).unwrap();
                assert_eq!(len, 2);
                assert_eq!(buf[0], round);
                echoed.insert((buf[0], buf[1]));
            }
        }
        assert_eq!(echoed.len(), 12);
    }

    #[test]
    fn batch_and_datagram_size_are_clamped() {
        let sock = UdpSocket::bind(LOCAL_V4).unwrap();
        let bs = BatchSocket::new(sock, 0, 0);
        assert_eq!((bs.batch, bs.max_datagram, bs.buf.len()), (1, 1, 1));
        let sock = UdpSocket::bind(LOCAL_V4).unwrap();
        let bs = BatchSocket::new(sock, 5000, 2);
        assert_eq!((bs.batch, bs.buf.len()), (1024, 2048));
        assert!(format!("{bs:?}").contains("batch: 1024"));
        let sock = UdpSocket::bind(LOCAL_V4).unwrap();
        let bs = BatchSocket::new(sock, 2, usize::MAX);
        assert_eq!((bs.max_datagram, bs.buf.len()), (65_535, 131_070));
    }
}
