//! Splitting a client's byte stream into records: newline-delimited JSON on the main socket,
//! any one-byte delimiter on raw sockets. Memory per client is bounded by the record limit.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::time::Instant;

/// Read buffer per client; records may be longer and are assembled across reads.
const READ_BUFFER: usize = 16 * 1024;

/// What the stream yields next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole record, without its delimiter (and without a trailing `\r` for `\n`).
    Record(Vec<u8>),
    /// A record exceeded the limit; it is being skipped up to its delimiter.
    TooLong,
    /// A record was not complete within the idle timeout of its first byte (a client that
    /// trickles a byte now and then holds a slot no longer than one that sends nothing).
    Idle,
    /// Between records, nothing arrived for the idle timeout: a connection that holds a
    /// client slot without using it.
    Silent,
    /// The peer closed (or the stream failed).
    End,
}

/// See the module docs.
pub struct RecordReader<R> {
    reader: BufReader<R>,
    record: Vec<u8>,
    delimiter: u8,
    max: usize,
    idle: Duration,
    skipping: bool,
    /// When the first byte of the record being read arrived.
    started: Option<Instant>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    pub fn new(stream: R, delimiter: u8, max: usize, idle: Duration) -> Self {
        RecordReader {
            reader: BufReader::with_capacity(READ_BUFFER, stream),
            record: Vec::new(),
            delimiter,
            max,
            idle,
            skipping: false,
            started: None,
        }
    }

    pub async fn next(&mut self) -> Next {
        loop {
            let filled = if !self.idle.is_zero() {
                let deadline = self.started.unwrap_or_else(Instant::now) + self.idle;
                match tokio::time::timeout_at(deadline, self.reader.fill_buf()).await {
                    Ok(filled) => filled,
                    Err(_) if self.started.is_none() => return Next::Silent,
                    Err(_) => {
                        self.record.clear();
                        self.skipping = false;
                        self.started = None;
                        return Next::Idle;
                    }
                }
            } else {
                self.reader.fill_buf().await
            };
            let buffer = match filled {
                Ok(buffer) if !buffer.is_empty() => buffer,
                _ => {
                    // End of stream: a last record without delimiter still counts.
                    let last = std::mem::take(&mut self.record);
                    return if self.skipping || last.is_empty() {
                        Next::End
                    } else {
                        Next::Record(last)
                    };
                }
            };
            let end = buffer.iter().position(|b| *b == self.delimiter);
            // The record's clock starts at its first byte; a delimiter ends it.
            let started = *self.started.get_or_insert_with(Instant::now);
            let chunk = &buffer[..end.unwrap_or(buffer.len())];
            let used = chunk.len() + usize::from(end.is_some());
            let mut too_long = false;
            if !self.skipping {
                if self.record.len() + chunk.len() > self.max {
                    self.skipping = true;
                    self.record.clear();
                    too_long = true;
                } else {
                    self.record.extend_from_slice(chunk);
                }
            }
            self.reader.consume(used);
            self.started = end.is_none().then_some(started);
            if too_long {
                if end.is_some() {
                    self.skipping = false;
                }
                return Next::TooLong;
            }
            if end.is_some() {
                if self.skipping {
                    self.skipping = false;
                    continue;
                }
                let mut record = std::mem::take(&mut self.record);
                if self.delimiter == b'\n' && record.last() == Some(&b'\r') {
                    record.pop();
                }
                return Next::Record(record);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn all(input: &[u8], delimiter: u8, max: usize) -> Vec<Next> {
        let mut reader = RecordReader::new(input, delimiter, max, Duration::ZERO);
        let mut out = Vec::new();
        loop {
            let next = reader.next().await;
            let end = next == Next::End;
            out.push(next);
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn splits_and_skips_long_records() {
        let got = all(b"a\r\nbb\n0123456789\nc", b'\n', 5).await;
        assert_eq!(
            got,
            vec![
                Next::Record(b"a".to_vec()),
                Next::Record(b"bb".to_vec()),
                Next::TooLong,
                Next::Record(b"c".to_vec()),
                Next::End
            ]
        );
        let got = all(b"1;2;;3", b';', 5).await;
        assert_eq!(
            got[..3],
            [
                Next::Record(b"1".to_vec()),
                Next::Record(b"2".to_vec()),
                Next::Record(vec![])
            ]
        );
    }

    #[tokio::test]
    async fn half_record_idles_out() {
        let (client, server) = tokio::io::duplex(64);
        let mut reader = RecordReader::new(server, b'\n', 100, Duration::from_millis(50));
        use tokio::io::AsyncWriteExt;
        let mut client = client;
        client.write_all(b"{\"half").await.expect("write");
        assert_eq!(reader.next().await, Next::Idle);
        client.write_all(b"x\n").await.expect("write");
        assert_eq!(reader.next().await, Next::Record(b"x".to_vec()));
    }

    /// A byte every so often does not keep a half line alive: it must be
    /// complete within the idle timeout of its first byte.
    #[tokio::test(start_paused = true)]
    async fn a_trickled_line_idles_out_at_the_timeout_after_its_first_byte() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64);
        let idle = Duration::from_secs(60);
        let mut reader = RecordReader::new(server, b'\n', 100, idle);
        let start = Instant::now();
        let trickle = tokio::spawn(async move {
            for byte in b"{\"topic\"" {
                client.write_all(&[*byte]).await.expect("write");
                tokio::time::sleep(Duration::from_secs(59)).await;
            }
            client
        });
        assert_eq!(reader.next().await, Next::Idle);
        assert_eq!(
            start.elapsed(),
            idle,
            "cut one idle timeout after the first byte"
        );
        drop(trickle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_idles_out_between_records() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = RecordReader::new(server, b'\n', 100, Duration::from_secs(60));
        assert_eq!(reader.next().await, Next::Silent, "nothing sent at all");
        use tokio::io::AsyncWriteExt;
        client.write_all(b"a\n").await.expect("write");
        assert_eq!(reader.next().await, Next::Record(b"a".to_vec()));
        assert_eq!(reader.next().await, Next::Silent, "nothing after a record");
    }
}
