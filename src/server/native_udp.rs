//! The native protocol over UDP: plain threads, each with its own `SO_REUSEPORT` socket,
//! moving batches of datagrams per system call. A batch's lines are decided through one
//! engine batch; each datagram's replies go back in one datagram, never larger than the
//! request (texts are shortened, and replies that cannot fit are left out and counted).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use crate::net::udp_batch::BatchSocket;
use crate::proto::native::{self as wire, datagram_lines, Parsed};

use super::metrics::{Proto, RequestError, Tally};
use super::native::{answer, fit_replies, recycle, TextBuf};
use super::Shared;

/// Datagrams moved per `recvmmsg` / `sendmmsg`.
const BATCH: usize = 64;

/// Serves `sock` until `stop` is set (the socket's receive timeout bounds how long that takes
/// to be noticed). Datagrams that must wait for SPF lookups are answered by tasks on `rt`.
pub(crate) fn worker(
    sock: std::net::UdpSocket,
    shared: &Arc<Shared>,
    stop: &AtomicBool,
    rt: &tokio::runtime::Handle,
) {
    let limits = &shared.settings.limits;
    // Replies of held datagrams go out through the same socket (another descriptor of it).
    let reply_sock = match sock.try_clone() {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            debug!(error = %e, "udp socket not cloned: SPF misses on UDP fall back at once");
            None
        }
    };
    let mut bs = BatchSocket::new(sock, BATCH, limits.udp_max_datagram);
    let mut texts = TextBuf::default();
    let mut tally = Tally::new(Proto::NativeUdp);
    let mut out: Vec<u8> = Vec::new();
    // Every reply of the batch, in its full and shortest forms.
    let mut forms = Forms::default();
    // (datagram, number of its lines) for each datagram answered, in order.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    // (datagram, start, end) in `out`.
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    // Kept empty between batches (their items borrow the batch's buffers), for their
    // allocations.
    let mut reqs_kept: Vec<Parsed<'static>> = Vec::new();
    let mut sends_kept: Vec<(SocketAddr, &'static [u8])> = Vec::new();
    // Whether each request of `reqs` passed SPF (empty when SPF lookups are off).
    let mut spf = super::spf::SpfBatch::default();
    while !stop.load(Ordering::Relaxed) {
        let n = match bs.recv() {
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "udp receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        out.clear();
        spans.clear();
        runs.clear();
        forms.clear();
        {
            // The lines of all datagrams, in datagram order.
            let mut reqs: Vec<Parsed<'_>> = recycle(std::mem::take(&mut reqs_kept));
            spf.passes.clear();
            for d in 0..n {
                let (data, from) = bs.datagram(d);
                if !shared.allow.allows(from.ip()) {
                    shared.refuse(from, Proto::NativeUdp.label());
                    continue;
                }
                if bs.truncated(d) {
                    tally.error(RequestError::UdpTruncated);
                    continue;
                }
                let before = reqs.len();
                reqs.extend(datagram_lines(data, limits.max_line));
                if let Some(s) = &shared.spf {
                    let missed = spf.append_cached(&s.spf, &reqs[before..]);
                    // A datagram with a request whose SPF result is not cached waits on a task
                    // of its own; this thread goes on with the others.
                    if missed {
                        if let Some(reply_sock) = reply_sock.as_ref().filter(|_| s.hold()) {
                            reqs.truncate(before);
                            spf.passes.truncate(before);
                            hold(shared, rt, reply_sock, data.to_vec(), from);
                            continue;
                        }
                        s.count_full();
                    }
                }
                runs.push((d, reqs.len() - before));
            }
            // Which form of each reply a datagram can afford is decided once all of its
            // replies are known.
            answer(
                shared,
                &reqs,
                &spf.passes,
                &mut texts,
                &mut tally,
                |id, reply| forms.push(id, reply),
            );
            reqs_kept = recycle(reqs);
        }
        let mut first = 0;
        for &(d, count) in &runs {
            let lines = forms.lines(first..first + count);
            let begin = out.len();
            let dropped = fit_replies(lines, bs.datagram(d).0.len(), &mut out);
            tally.udp_dropped(dropped);
            if out.len() > begin {
                spans.push((d, begin, out.len()));
            }
            first += count;
        }
        shared.metrics.flush(&mut tally);
        let mut to_send: Vec<(SocketAddr, &[u8])> = recycle(std::mem::take(&mut sends_kept));
        to_send.extend(
            spans
                .iter()
                .map(|&(d, s, e)| (bs.datagram(d).1, &out[s..e])),
        );
        if let Err(e) = bs.send(&to_send) {
            debug!(error = %e, "udp send failed");
        }
        sends_kept = recycle(to_send);
    }
}

/// Answers one datagram on a task of `rt` once the SPF lookups of its requests are done (at
/// most the timeout), then gives its place back.
fn hold(
    shared: &Arc<Shared>,
    rt: &tokio::runtime::Handle,
    sock: &Arc<std::net::UdpSocket>,
    data: Vec<u8>,
    from: SocketAddr,
) {
    let (shared, sock) = (shared.clone(), sock.clone());
    rt.spawn(async move {
        let Some(s) = shared.spf.as_ref() else {
            return;
        };
        let limits = &shared.settings.limits;
        let reqs: Vec<Parsed<'_>> = datagram_lines(&data, limits.max_line).collect();
        // Counted by the worker already.
        let mut spf = super::spf::SpfBatch::default();
        spf.resolve(&s.spf, &reqs, false).await;
        let mut tally = Tally::new(Proto::NativeUdp);
        let mut forms = Forms::default();
        answer(
            &shared,
            &reqs,
            &spf.passes,
            &mut TextBuf::default(),
            &mut tally,
            |id, reply| forms.push(id, reply),
        );
        let lines = forms.lines(0..forms.len());
        let mut out = Vec::new();
        tally.udp_dropped(fit_replies(lines, data.len(), &mut out));
        shared.metrics.flush(&mut tally);
        if !out.is_empty() {
            if let Err(e) = sock.send_to(&out, from) {
                debug!(error = %e, "udp send failed");
            }
        }
        s.release();
    });
}

/// Replies encoded for `fit_replies`: every reply's line in one buffer, with where each starts
/// and ends and the length of its head (the head and a newline are its shortest form).
#[derive(Default)]
struct Forms {
    full: Vec<u8>,
    spans: Vec<(usize, usize, usize)>,
}

impl Forms {
    fn clear(&mut self) {
        self.full.clear();
        self.spans.clear();
    }

    fn push(&mut self, id: Option<&str>, reply: &wire::Reply<'_>) {
        let start = self.full.len();
        let head = wire::encode_split(id, reply, &mut self.full);
        self.spans.push((start, self.full.len(), head));
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    /// The replies `range`, as `fit_replies` takes them.
    fn lines(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (&[u8], usize)> + Clone + '_ {
        self.spans[range]
            .iter()
            .map(|&(start, end, head)| (&self.full[start..end], head))
    }
}
