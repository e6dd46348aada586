//! A TCP fault proxy for fault-injection tests: forwards every connection to one upstream and, on
//! command, resets all traffic (existing connections and new ones) or blackholes it (stops
//! forwarding bytes in both directions but keeps every socket open, as a partitioned network does).
//! It works below TLS, so it sees no paths: a fault hits everything that goes through it.
//!
//! ```ignore
//! let api = FaultProxy::start(apiserver_addr).await;   // point a kubeconfig at api.addr()
//! let control = api.control();
//! control.fault_for(Fault::Reset, Duration::from_secs(10));
//! // A hook on another proxy starts a fault at the exact moment an answer passes through it:
//! oauth.on_upstream_bytes(move |chunk| if contains(chunk, b"refresh_token") { control.fault_for(..) });
//! ```

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Reset every open connection and every new one at once.
    Reset,
    /// Forward nothing, close nothing: bytes wait in the sockets until the fault ends.
    Blackhole,
}

/// A hook that sees each chunk the upstream sends, before it is forwarded.
type Hook = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct State {
    mode: watch::Sender<Fault>,
    /// Bumped by every change, so that a timed fault ends only the fault it started.
    generation: AtomicU64,
    hook: Mutex<Option<Hook>>,
    accepted: AtomicU64,
    reset: AtomicU64,
    faults: AtomicU64,
}

/// A handle that changes the proxy's fault; cheap to clone into hooks and tasks.
#[derive(Clone)]
pub struct FaultControl(Arc<State>);

impl FaultControl {
    /// Applies `fault` until the next change.
    pub fn set(&self, fault: Fault) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        if fault != Fault::None {
            self.0.faults.fetch_add(1, Ordering::SeqCst);
        }
        self.0.mode.send_replace(fault);
    }

    /// Applies `fault` for `duration`, then forwards again (unless changed meanwhile).
    pub fn fault_for(&self, fault: Fault, duration: Duration) {
        self.set(fault);
        let generation = self.0.generation.load(Ordering::SeqCst);
        let state = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            if state.generation.load(Ordering::SeqCst) == generation {
                state.generation.fetch_add(1, Ordering::SeqCst);
                state.mode.send_replace(Fault::None);
            }
        });
    }

    /// The fault in effect now.
    pub fn current(&self) -> Fault {
        *self.0.mode.borrow()
    }

    /// How many faults have been started.
    pub fn faults_started(&self) -> u64 {
        self.0.faults.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.0.accepted.load(Ordering::SeqCst)
    }

    /// Connections reset by a [`Fault::Reset`] so far (open ones and refused new ones).
    pub fn connections_reset(&self) -> u64 {
        self.0.reset.load(Ordering::SeqCst)
    }
}

/// The proxy, listening on 127.0.0.1 until dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    control: FaultControl,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts forwarding a fresh port on 127.0.0.1 to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap();
        let control = FaultControl(Arc::new(State {
            mode: watch::channel(Fault::None).0,
            generation: AtomicU64::new(0),
            hook: Mutex::new(None),
            accepted: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        }));
        let state = control.0.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                state.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(connection(client, upstream, state.clone()));
            }
        });
        Self { addr, control, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The handle that changes the fault.
    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }

    /// Calls `hook` with each chunk the upstream sends (on every connection), before forwarding
    /// it: a fault the hook starts applies to that very chunk.
    pub fn on_upstream_bytes(&self, hook: impl Fn(&[u8]) + Send + Sync + 'static) {
        *self.control.0.hook.lock().unwrap() = Some(Arc::new(hook));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn connection(client: TcpStream, upstream: SocketAddr, state: Arc<State>) {
    if *state.mode.borrow() == Fault::Reset {
        // SO_LINGER 0: closing sends a reset, not an orderly FIN.
        let _ = client.set_zero_linger();
        state.reset.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, state.mode.subscribe(), None);
    let down = pump(server_read, client_write, state.mode.subscribe(), Some(&state));
    tokio::pin!(up, down);
    // Both directions see a reset at once; an orderly end waits for the other direction.
    let reset = tokio::select! {
        r = &mut up => r | down.await,
        r = &mut down => r | up.await,
    };
    if reset {
        state.reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while the fault allows it. True when it ended because of a reset.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Fault>,
    hooked: Option<&State>,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    // On a reset, both sockets this direction touches close with SO_LINGER 0: a reset, not a FIN.
    let reset = |from: &OwnedReadHalf, to: &OwnedWriteHalf| {
        let _ = from.as_ref().set_zero_linger();
        let _ = to.as_ref().set_zero_linger();
        true
    };
    loop {
        match pass(&mut mode).await {
            Some(true) => return reset(&from, &to),
            Some(false) => return false,
            None => {}
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            },
            _ = mode.changed() => continue,
        };
        // The hook in effect now (set after this connection opened, too: clients keep connections).
        let hook = hooked.and_then(|s| s.hook.lock().unwrap().clone());
        if let Some(h) = hook {
            h(&buf[..n]);
        }
        // A fault that began while reading (or in the hook) holds this chunk too.
        match pass(&mut mode).await {
            Some(true) => return reset(&from, &to),
            Some(false) => return false,
            None => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
}

/// Waits while blackholed. `None`: forward; `Some(true)`: reset; `Some(false)`: the proxy is gone.
async fn pass(mode: &mut watch::Receiver<Fault>) -> Option<bool> {
    loop {
        match *mode.borrow_and_update() {
            Fault::None => return None,
            Fault::Reset => return Some(true),
            Fault::Blackhole => {}
        }
        if mode.changed().await.is_err() {
            return Some(false);
        }
    }
}
