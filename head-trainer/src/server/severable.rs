//! Connections that shutdown can sever.
//!
//! tonic's graceful shutdown waits for every connection to close, and it serves each one on
//! a task of its own: a client that keeps a stream open (an idle Enroll, a health `Watch`)
//! would hold a SIGTERM off for ever, and aborting the server's task leaves those
//! connection tasks running. Wrapping each accepted socket lets the server, once the grace
//! period is over, make every connection read end-of-file and fail its writes, so hyper
//! closes it and the shutdown completes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted TCP connection that ends when `sever` is cancelled.
pub struct Severable {
    inner: TcpStream,
    severed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Severable {
    pub fn new(inner: TcpStream, sever: &CancellationToken) -> Self {
        Self {
            inner,
            severed: Box::pin(sever.clone().cancelled_owned()),
        }
    }

    /// Polls the sever signal (registering the waker, so a sever wakes an idle connection).
    fn is_severed(&mut self, cx: &mut Context<'_>) -> bool {
        self.severed.as_mut().poll(cx).is_ready()
    }
}

fn severed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "server shut down")
}

impl AsyncRead for Severable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_severed(cx) {
            return Poll::Ready(Ok(())); // end of file
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Severable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Severable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
