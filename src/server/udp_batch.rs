//! UDP sockets for the native protocol: one `SO_REUSEPORT` socket per worker thread.
//! (Interim version: one datagram per system call.)

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds `n` UDP sockets to one address with `SO_REUSEPORT`, so the kernel spreads datagrams
/// over them; with port 0 the others take the port the first one got.
pub fn bind_reuseport(
    addr: SocketAddr,
    n: usize,
    recv_buffer: usize,
    timeout: Duration,
) -> io::Result<Vec<UdpSocket>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        let _ = s.set_recv_buffer_size(recv_buffer);
        s.bind(&addr.into())?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let sock: UdpSocket = s.into();
        addr = sock.local_addr()?;
        out.push(sock);
    }
    Ok(out)
}

/// One worker's socket and receive buffers.
#[derive(Debug)]
pub struct BatchSocket {
    sock: UdpSocket,
    bufs: Vec<Vec<u8>>,
    got: Vec<(usize, SocketAddr)>,
    max: usize,
}

impl BatchSocket {
    /// Buffers for up to `batch` datagrams of `max_datagram` bytes.
    pub fn new(sock: UdpSocket, batch: usize, max_datagram: usize) -> Self {
        Self {
            sock,
            bufs: (0..batch.max(1))
                .map(|_| vec![0; max_datagram + 1])
                .collect(),
            got: Vec::new(),
            max: max_datagram,
        }
    }

    /// Waits for one datagram, then takes what else is queued without waiting.
    pub fn recv(&mut self) -> io::Result<usize> {
        self.got.clear();
        for i in 0..self.bufs.len() {
            if i == 1 {
                self.sock.set_nonblocking(true)?;
            }
            match self.sock.recv_from(&mut self.bufs[i]) {
                Ok(got) => self.got.push(got),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    break
                }
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        self.sock.set_nonblocking(false)?;
        Ok(self.got.len())
    }

    /// The `i`-th datagram of the last `recv`.
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        let (n, from) = self.got[i];
        (&self.bufs[i][..n.min(self.max)], from)
    }

    /// Whether the `i`-th datagram was longer than the maximum.
    pub fn truncated(&self, i: usize) -> bool {
        self.got[i].0 > self.max
    }

    /// Sends replies; failures of single replies are skipped (UDP is best effort).
    pub fn send(&mut self, replies: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
        Ok(replies
            .iter()
            .filter(|(to, b)| self.sock.send_to(b, to).is_ok())
            .count())
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}
