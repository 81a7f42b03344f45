//! Real traffic: a UDP stream from a pod (one datagram every few milliseconds, tagged with the pod's name and a
//! sequence number), a UDP sink on the server that records who each datagram came from and when, and a TCP echo
//! service for long-lived flows. Every socket is created inside its namespace; the threads run until stopped or
//! dropped.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use causeway_testsupport::netns::Netns;

use crate::topology::Pod;

/// UDP port of the server's sink.
pub const UDP_PORT: u16 = 5000;
/// TCP port of the server's echo service.
pub const TCP_PORT: u16 = 5001;

/// One datagram as the server saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub src: IpAddr,
    /// The sending pod's name (from the payload).
    pub sender: String,
    pub seq: u64,
}

/// Records every datagram arriving on `addr` inside a namespace.
pub struct UdpSink {
    pub addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<UdpSink> {
        let socket =
            ns.run_in(move || UdpSocket::bind(addr))?.with_context(|| format!("binding the sink on {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (arrivals.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                let at = Instant::now();
                // Anything that does not parse is still a datagram that arrived: keep its source.
                let text = String::from_utf8_lossy(&buf[..n]);
                let mut words = text.split_whitespace();
                let sender = words.next().unwrap_or("").to_string();
                let seq = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                lock(&a).push(Arrival { at, src: from.ip(), sender, seq });
            }
        });
        Ok(UdpSink { addr, arrivals, stop, thread: Some(thread) })
    }

    /// Every arrival so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.arrivals).clone()
    }

    /// Source addresses of `sender`'s datagrams that arrived at or after `since`.
    pub fn sources(&self, sender: &str, since: Instant) -> BTreeSet<IpAddr> {
        lock(&self.arrivals).iter().filter(|a| a.sender == sender && a.at >= since).map(|a| a.src).collect()
    }

    /// Arrival time of the first datagram of `sender` from `src` at or after `since`.
    pub fn first_from(&self, sender: &str, src: IpAddr, since: Instant) -> Option<Instant> {
        lock(&self.arrivals).iter().find(|a| a.sender == sender && a.src == src && a.at >= since).map(|a| a.at)
    }

    /// Arrival time of the last datagram of `sender` (from any source).
    pub fn last_from(&self, sender: &str) -> Option<(Instant, IpAddr)> {
        lock(&self.arrivals).iter().rev().find(|a| a.sender == sender).map(|a| (a.at, a.src))
    }

    /// Waits until a datagram of `sender` from `src` arrives at or after `since`; its arrival time.
    pub fn wait_from(&self, sender: &str, src: IpAddr, since: Instant, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.first_from(sender, src, since) {
                return Some(at);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Drops the recorded arrivals (long benchmarks).
    pub fn clear(&self) {
        lock(&self.arrivals).clear();
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod sending `"<pod name> <seq>"` to `dst` every `interval` until stopped. Send errors (no route yet, a
/// neighbour not resolved) are counted, not fatal: the stream is how outages are measured.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpStream {
    pub fn start(pod: &Pod, dst: SocketAddr, interval: Duration) -> Result<UdpStream> {
        let socket = pod.ns.run_in(|| UdpSocket::bind("0.0.0.0:0"))?.context("binding the pod's UDP socket")?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, c, name) = (stop.clone(), sent.clone(), pod.name.clone());
        let thread = std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                seq += 1;
                if socket.send_to(format!("{name} {seq}").as_bytes(), dst).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        });
        Ok(UdpStream { stop, sent, thread: Some(thread) })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes the echo service sends first: the client's address as the server sees it, space-padded.
const PEER_LEN: usize = 40;

/// TCP echo service in a namespace: each connection first gets the peer address the server sees, then its bytes
/// echoed back.
pub struct TcpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<TcpEcho> {
        let listener = ns.run_in(move || TcpListener::bind(addr))?.with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let s = s.clone();
                        std::thread::spawn(move || echo(conn, peer, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(TcpEcho { addr, stop, thread: Some(thread) })
    }
}

fn echo(mut conn: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut hello = format!("{}", peer.ip()).into_bytes();
    hello.resize(PEER_LEN, b' ');
    if conn.write_all(&hello).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = conn.shutdown(Shutdown::Both);
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A long-lived TCP connection from a pod to the echo service: 1 KiB every 10 ms, each echo checked.
pub struct TcpFlow {
    /// The source address the server saw when the connection opened.
    pub seen_as: IpAddr,
    echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl TcpFlow {
    pub fn start(pod: &Pod, server: SocketAddr) -> Result<TcpFlow> {
        let stream = pod
            .ns
            .run_in(move || TcpStream::connect_timeout(&server, Duration::from_secs(5)))?
            .with_context(|| format!("connecting from {} to {server}", pod.name))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut stream = stream;
        let mut hello = [0u8; PEER_LEN];
        stream.read_exact(&mut hello).context("reading the server's view of the peer")?;
        let seen_as: IpAddr = String::from_utf8_lossy(&hello).trim().parse().context("peer address from the server")?;
        let echoed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (echoed.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            let mut seq = 0u8;
            while !s.load(Ordering::Relaxed) {
                seq = seq.wrapping_add(1);
                let chunk = vec![seq; 1024];
                stream.write_all(&chunk).context("writing to the flow")?;
                let mut back = vec![0u8; chunk.len()];
                stream.read_exact(&mut back).context("reading the echo")?;
                anyhow::ensure!(back == chunk, "echo corrupted");
                e.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        Ok(TcpFlow { seen_as, echoed, stop, thread: Some(thread) })
    }

    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Waits until at least `bytes` more are echoed; an error (with the flow's own error if it died) otherwise.
    pub fn progresses(&mut self, bytes: u64, timeout: Duration) -> Result<()> {
        let start = self.echoed();
        let deadline = Instant::now() + timeout;
        while self.echoed() < start + bytes {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let err = match self.thread.take().map(|t| t.join()) {
                    Some(Ok(Err(e))) => e,
                    _ => anyhow::anyhow!("the flow thread ended"),
                };
                return Err(err.context("the TCP flow died"));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the TCP flow made no progress for {timeout:?} ({} bytes echoed in total)",
                self.echoed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens a TCP connection from `pod` to the echo service and returns the source address the server saw.
pub fn tcp_source_seen(pod: &Pod, server: SocketAddr) -> Result<IpAddr> {
    let mut stream = pod
        .ns
        .run_in(move || TcpStream::connect_timeout(&server, Duration::from_secs(5)))?
        .with_context(|| format!("connecting from {} to {server}", pod.name))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut hello = [0u8; PEER_LEN];
    stream.read_exact(&mut hello).context("reading the server's view of the peer")?;
    String::from_utf8_lossy(&hello).trim().parse().context("peer address from the server")
}
