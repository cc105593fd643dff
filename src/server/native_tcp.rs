//! The native protocol over TCP: pipelined request lines, answered in order, one write per
//! read (up to `requests-per-read` lines, so one pipelining client cannot starve the others).

use crate::proto::native::{self as wire, Framed, LineFramer, Parsed};

use super::conn::{Conn, Read, Stream};
use super::metrics::{Proto, Tally};
use super::native::{answer, recycle, TextBuf};
use super::Shared;

/// Serves one connection until the peer is done (after shutting down its sending side, it
/// gets its answers and then the server closes), it idles out, or the server shuts down.
pub(crate) async fn serve<S: Stream>(mut conn: Conn<S>, peer: &str, shared: &Shared) {
    let limits = &shared.settings.limits;
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut out: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut texts = TextBuf::default();
    let mut tally = Tally::new(Proto::NativeTcp);
    let mut framer = LineFramer::default();
    let mut reqs: Vec<Parsed<'static>> = Vec::new();
    // Whether each request of a batch passed SPF (empty when SPF lookups are off).
    let mut spf = super::spf::SpfBatch::default();
    let mut eof = false;
    // Whether the buffer may still hold complete lines (the last batch stopped at the limit).
    let mut more = false;
    loop {
        if !more && !eof {
            match conn.read(&mut buf).await {
                Read::Data => {}
                Read::Eof => eof = true,
                Read::Close => break,
            }
        }
        let mut pos = 0;
        more = false;
        // The request list borrows from `buf`; it is emptied before `buf` changes, and its
        // allocation is kept from one batch to the next.
        let mut batch = recycle(std::mem::take(&mut reqs));
        loop {
            if batch.len() >= limits.requests_per_read {
                more = true;
                break;
            }
            let (n, framed) = framer.next(&buf[pos..], limits.max_line, eof);
            pos += n;
            match framed {
                Framed::Line(r) => batch.push(r),
                Framed::Skipped => {}
                Framed::NeedMore => break,
            }
        }
        if let Some(s) = &shared.spf {
            // Only this connection waits, at most the timeout.
            spf.resolve(&s.spf, &batch, true).await;
        }
        answer(
            shared,
            &batch,
            &spf.passes,
            &mut texts,
            &mut tally,
            |id, reply| wire::encode(id, reply, &mut out),
        );
        reqs = recycle(batch);
        buf.drain(..pos);
        shared.metrics.flush(&mut tally);
        if !out.is_empty() {
            if !conn.write_all(&out).await {
                break;
            }
            out.clear();
        }
        if eof && !more {
            break;
        }
    }
    conn.shutdown();
    tracing::debug!(%peer, "native connection closed");
}
