//! A loopback TCP proxy whose link can be cut at run time, for the fault-injection tests: the
//! network between the balancer and one metering server passes, delays, black-holes or refuses
//! traffic on command.
//!
//! Several proxies may share one [`Link`] (the balancer → server direction and the server →
//! each balancer direction), so one switch partitions a server from the balancers both ways,
//! as a real network fault would.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a link does to the traffic crossing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything at once.
    Pass,
    /// Forward every chunk after this delay, in order: late delivery, as on a congested WAN.
    /// Longer than a caller's timeout, a request still lands after the caller gave up.
    Delay(Duration),
    /// Accept connections and hold them, forwarding nothing and answering nothing: the caller
    /// sees only timeouts. Held connections are closed, their bytes dropped, when the mode
    /// changes, so nothing sent into the hole arrives later.
    BlackHole,
    /// Close every connection at once, new and established, answering nothing: the caller
    /// sees its connection closed, as by a crashed peer or a rejecting firewall.
    Refuse,
}

/// The switch shared by the proxies of one link.
#[derive(Clone)]
pub struct Link {
    mode: watch::Sender<Mode>,
}

impl Default for Link {
    fn default() -> Self {
        Self::new()
    }
}

impl Link {
    /// A link that passes traffic.
    pub fn new() -> Self {
        Self {
            mode: watch::Sender::new(Mode::Pass),
        }
    }

    /// Switches every proxy of the link, including connections already open.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// A proxy on a free loopback port forwarding to `127.0.0.1:upstream` through this link.
    /// The upstream need not be up yet (or ever): a connection it refuses is closed.
    pub async fn proxy(&self, upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let mode = self.mode.subscribe();
        let task = tokio::spawn(accept_loop(listener, upstream, mode));
        Proxy { port, task }
    }
}

/// A running proxy; stops accepting (and its open connections end) when dropped.
pub struct Proxy {
    port: u16,
    task: JoinHandle<()>,
}

impl Proxy {
    /// The URL to give callers instead of the upstream's.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: u16, mode: watch::Receiver<Mode>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                connections.spawn(connection(client, upstream, mode.clone()));
            }
            // Reap finished connections so the set does not grow over a long soak.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Dropping the JoinSet (when this task is aborted) aborts every connection.
}

/// Why a pump stopped early: the connection is to be closed in both directions.
struct Cut;

async fn connection(client: TcpStream, upstream: u16, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    let now = *mode.borrow_and_update();
    match now {
        Mode::Refuse => return,
        // Hold the caller's connection without ever reaching the upstream.
        Mode::BlackHole => {
            let _ = mode.wait_for(|m| *m != Mode::BlackHole).await;
            return;
        }
        Mode::Pass | Mode::Delay(_) => {}
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction cut ends both: try_join drops the other pump, closing its halves.
    let _ = tokio::try_join!(
        pump(client_read, server_write, mode.clone()),
        pump(server_read, client_write, mode),
    );
}

/// Copies `from` to `to` under the link's mode until end of stream (then half-closes `to`) or
/// until the link refuses or black-holes the connection.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) -> Result<(), Cut> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => read.map_err(|_| Cut)?,
            // An idle pooled connection must notice a refusal too, not only a busy one.
            changed = mode.changed() => {
                changed.map_err(|_| Cut)?;
                if *mode.borrow_and_update() == Mode::Refuse {
                    return Err(Cut);
                }
                continue;
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let current = *mode.borrow_and_update();
        match current {
            Mode::Pass => {}
            Mode::Delay(delay) => tokio::time::sleep(delay).await,
            Mode::BlackHole => {
                // The bytes go nowhere; the caller waits until it gives up or the link heals,
                // and then the connection is closed with the bytes dropped.
                let _ = mode.wait_for(|m| *m != Mode::BlackHole).await;
                return Err(Cut);
            }
            Mode::Refuse => return Err(Cut),
        }
        to.write_all(&buf[..n]).await.map_err(|_| Cut)?;
    }
}
