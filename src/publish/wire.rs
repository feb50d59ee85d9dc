//! The MQTT connection's bytes on the wire, for `status` and the health report: counted on the
//! TCP stream itself, under the proxy's CONNECT, TLS and the WebSocket, so they are what a SIM
//! plan is billed for, less the TCP/IP headers and retransmissions. Totals since the start,
//! across reconnects.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use rumqttc::AsyncReadWrite;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes sent and received on every MQTT connection since the start.
#[derive(Debug, Default)]
pub struct WireBytes {
    sent: AtomicU64,
    received: AtomicU64,
}

impl WireBytes {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// `stream`, counting into these totals.
    pub fn meter(self: &Arc<Self>, stream: Box<dyn AsyncReadWrite>) -> Box<dyn AsyncReadWrite> {
        Box::new(Metered {
            inner: stream,
            bytes: self.clone(),
        })
    }
}

struct Metered {
    inner: Box<dyn AsyncReadWrite>,
    bytes: Arc<WireBytes>,
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.bytes
            .received
            .fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            self.bytes.sent.fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = polled {
            self.bytes.sent.fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_what_crosses_the_stream_each_way() {
        let bytes = Arc::new(WireBytes::default());
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut metered = bytes.meter(Box::new(ours));
        metered.write_all(&[7; 100]).await.expect("write");
        metered.flush().await.expect("flush");
        let mut got = [0; 100];
        theirs.read_exact(&mut got).await.expect("read");
        theirs.write_all(&[1; 30]).await.expect("answer");
        let mut answer = [0; 30];
        metered.read_exact(&mut answer).await.expect("read answer");
        assert_eq!((bytes.sent(), bytes.received()), (100, 30));
        // A second connection adds to the totals.
        let (again, _theirs) = tokio::io::duplex(1024);
        let mut metered = bytes.meter(Box::new(again));
        metered.write_all(&[0; 5]).await.expect("write");
        assert_eq!(bytes.sent(), 105);
    }
}
