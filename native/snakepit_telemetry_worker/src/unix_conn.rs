//! Unix socket connections for the telemetry server that wake the serving
//! thread only for what it waits on.
//!
//! tokio registers every `UnixStream` for read and write readiness
//! (edge-triggered). A unix socket reports itself writable again each time
//! the reader drains it, so after every message we send, the reader's
//! `recv` woke our thread once more for nothing: two wakes per batch where
//! TCP costs one. A [`UnixConn`] is registered for reads only; writes go
//! straight to the socket, and only a write that returned `WouldBlock`
//! (the kernel buffer is full) registers a second descriptor of the same
//! socket for writability, waits on it, and drops it once a write went
//! through.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixListener;
use tokio_stream::Stream;

/// One accepted connection; see the module documentation.
#[derive(Debug)]
pub struct UnixConn {
    io: AsyncFd<std::os::unix::net::UnixStream>,
    /// A duplicate of `io`'s descriptor registered for writability, present
    /// only while a write waits for room in the socket buffer.
    write_wait: Option<AsyncFd<OwnedFd>>,
}

impl UnixConn {
    /// Wraps a connected, non-blocking socket, registering it with the
    /// current runtime for reads only.
    pub fn new(stream: std::os::unix::net::UnixStream) -> io::Result<UnixConn> {
        stream.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the stream, which keeps its descriptor
        // open and unchanged until the AsyncFd is dropped.
        let io = unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE)? };
        Ok(UnixConn {
            io,
            write_wait: None,
        })
    }

    /// Whether a write waits for room in the socket buffer.
    #[cfg(test)]
    fn write_waiting(&self) -> bool {
        self.write_wait.is_some()
    }

    /// Runs `write` until it does not return `WouldBlock`, waiting for
    /// writability (on a lazily registered duplicate descriptor) between
    /// attempts.
    fn poll_write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&std::os::unix::net::UnixStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            if self.write_wait.is_none() {
                match write(self.io.get_ref()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Registration reports the socket's current state, so
                        // room made since the failed write is not missed.
                        let fd = self.io.get_ref().as_fd().try_clone_to_owned()?;
                        // SAFETY: a new descriptor owned by the AsyncFd alone,
                        // open until it is dropped.
                        let wait =
                            unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE)? };
                        self.write_wait = Some(wait);
                    }
                    other => return Poll::Ready(other),
                }
            }
            let Some(wait) = &self.write_wait else {
                continue;
            };
            let result = {
                let mut guard = ready!(wait.poll_write_ready(cx))?;
                match write(self.io.get_ref()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        continue;
                    }
                    other => other,
                }
            };
            // Stop listening for writability: it would wake the thread each
            // time the reader drains the socket.
            self.write_wait = None;
            return Poll::Ready(result);
        }
    }
}

impl AsyncRead for UnixConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let len = unfilled.len();
            let mut stream = guard.get_inner();
            match stream.read(unfilled) {
                Ok(n) => {
                    // A short read emptied the socket: wait for the next edge
                    // instead of a read that returns WouldBlock (as tokio's
                    // own streams do).
                    if n > 0 && n < len {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut io| io.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut io| io.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.io.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

/// Accepted connections of a unix listener, as [`UnixConn`]s.
#[derive(Debug)]
pub struct UnixIncoming {
    listener: UnixListener,
}

impl UnixIncoming {
    pub fn new(listener: UnixListener) -> UnixIncoming {
        UnixIncoming { listener }
    }
}

impl Stream for UnixIncoming {
    type Item = io::Result<UnixConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let (stream, _) = ready!(self.listener.poll_accept(cx))?;
        // into_std deregisters it and leaves it non-blocking.
        Poll::Ready(Some(stream.into_std().and_then(UnixConn::new)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// More than the socket buffers hold, written while the peer reads
    /// nothing at first: the writes wait for room (the WouldBlock path) and
    /// everything arrives in order; the other direction reads as usual.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_wait_for_room_and_reads_work() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut conn = UnixConn::new(ours).unwrap();
        let total = 8 << 20;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut theirs = theirs;
            // Read only once the writer is known to be blocked on a full buffer.
            started_rx.recv().unwrap();
            let mut got = Vec::with_capacity(total);
            let mut chunk = vec![0u8; 4096];
            while got.len() < total {
                let n = theirs.read(&mut chunk).unwrap();
                assert!(n > 0, "eof after {} bytes", got.len());
                got.extend_from_slice(&chunk[..n]);
            }
            theirs.write_all(b"reply").unwrap();
            got
        });
        // Write until a write has to wait (the buffer is full).
        let sent = std::future::poll_fn(|cx| {
            let mut sent = 0;
            while sent < total {
                match Pin::new(&mut conn).poll_write(cx, &data[sent..]) {
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => panic!("write failed: {e}"),
                    Poll::Pending => break,
                }
            }
            Poll::Ready(sent)
        })
        .await;
        assert!(sent < total, "8 MiB fit in the socket buffer");
        assert!(conn.write_waiting());
        started_tx.send(()).unwrap();
        conn.write_all(&data[sent..]).await.unwrap();
        assert!(!conn.write_waiting());
        let mut reply = [0u8; 5];
        conn.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert!(got == data, "bytes differ");
    }
}
