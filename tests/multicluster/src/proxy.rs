//! A loopback TCP proxy in front of a remote's etcd. Blocking it cuts every open connection and refuses new ones,
//! which is how a network partition looks to identity-sync, while the remote's etcd and apiserver keep running
//! (so the remote can change and be compacted meanwhile). TLS passes through untouched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub struct Proxy {
    addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let blocked = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (b, c) = (blocked.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if b.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut list = c.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|h| !h.is_finished());
                list.push(conn.abort_handle());
            }
        });
        Ok(Proxy { addr, blocked, conns, task })
    }

    /// Starts a proxy for an etcd endpoint URL such as `https://127.0.0.1:2379`.
    pub async fn for_endpoint(endpoint: &str) -> anyhow::Result<Proxy> {
        let hostport = endpoint.split("://").nth(1).unwrap_or(endpoint);
        let target: SocketAddr = hostport.parse().with_context(|| format!("endpoint {endpoint} is not ip:port"))?;
        Self::start(target).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::unblock`].
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            h.abort();
        }
    }

    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.block();
    }
}
