//! The mcp-credentials sidecar: a streaming reverse proxy on 127.0.0.1 that attaches the current
//! credential for each MCP upstream, with its credential store and admin listener.

use std::{future::Future, net::SocketAddr};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::{net::TcpListener, sync::watch};

pub mod admin;
/// The browser extension's endpoints (standalone `session.browser` credentials).
pub mod browser;
pub mod config;
pub mod credential;
pub mod error;
/// `login`: signing a person in for a standalone `authorizationCode` credential.
pub mod login;
pub mod metrics;
pub mod proxy;
pub mod report;
pub mod store;
pub mod telemetry;

use crate::{
    config::{Config, StoreConfig},
    metrics::Metrics,
    proxy::Proxy,
    store::Store,
};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The upstream client could not be built (TLS roots).
    #[error("cannot build the upstream client")]
    Client(#[from] proxy::ClientError),
    /// The Kubernetes client could not be configured.
    #[error("cannot connect to the Kubernetes API (set MCP_SIDECAR_CREDENTIALS_DIR to read files instead)")]
    Kubernetes(#[source] kube::Error),
    /// Standalone mode could not load its McpCredentials.
    #[error("standalone mode")]
    Standalone(#[from] store::standalone::StandaloneError),
    /// The browser extension's pairing code cannot be read or created.
    #[error(transparent)]
    Browser(#[from] browser::PairingError),
    /// Reports to the operator cannot be sent.
    #[error("reports to the operator")]
    Report(#[from] report::ReportError),
}

pub use mcp_credentials_core::process::install_crypto_provider;

/// Serves the proxy and the admin listener until `shutdown` completes, then lets open requests and
/// streams finish for the configured grace period.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    install_crypto_provider();
    let required: Vec<String> = match &config.store {
        // Standalone mode serves exactly the credentials of its file.
        StoreConfig::Standalone { credentials_file, .. } => store::standalone::load(credentials_file)?
            .iter()
            .map(kube::ResourceExt::name_any)
            .collect(),
        _ => config.credentials.iter().map(|w| w.name.clone()).collect(),
    };
    let store = Store::new(required);
    let metrics = Metrics::register();
    proxy::set_replay_wait(config.replay_wait);
    let client = proxy::upstream_client(&config.client)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { addr, source })
    };
    let proxy_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let probe_listener = match config.probe_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };

    let mut token_requests = None;
    let source = match &config.store {
        StoreConfig::Kubernetes { namespace } => {
            let client = kube::Client::try_default().await.map_err(RunError::Kubernetes)?;
            let namespace = namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            // The operator renews what an upstream rejected; standalone mode renews in-process.
            if let Some(settings) = &config.report {
                let reporter = report::Reporter::new(settings.clone(), &namespace, metrics.clone())?;
                tokio::spawn(reporter.run(store.clone()));
            }
            tokio::spawn(store::kubernetes::run(
                store.clone(),
                client,
                namespace,
                config.credentials.clone(),
            ))
        }
        StoreConfig::Files { dir } => tokio::spawn(store::files::run(
            store.clone(),
            dir.clone(),
            config.file_poll_interval,
        )),
        StoreConfig::Standalone {
            credentials_file,
            secrets_dir,
            discovery_allow_loopback,
        } => {
            let policy = mcp_credentials_core::source::OutboundPolicy {
                allow_loopback: *discovery_allow_loopback,
            };
            let (task, requests) =
                store::standalone::start(store.clone(), credentials_file, secrets_dir, policy).await?;
            token_requests = Some(requests);
            task
        }
    };

    // Standalone mode's status page starts sign-ins (`login` in-process).
    let sign_in_page = match &config.store {
        StoreConfig::Standalone {
            credentials_file,
            secrets_dir,
            discovery_allow_loopback,
        } => {
            let (file, dir) = (credentials_file.clone(), secrets_dir.clone());
            let policy = mcp_credentials_core::source::OutboundPolicy {
                allow_loopback: *discovery_allow_loopback,
            };
            Some(admin::SignInPage::new(move |name| {
                login::start_from_page(name, file.clone(), dir.clone(), policy)
            }))
        }
        _ => None,
    };
    tracing::info!(proxy = %config.listen, admin = %config.admin_listen, probes = ?config.probe_listen, credentials = ?store.names(), "serving");
    let proxy = Proxy {
        store: store.clone(),
        client,
        metrics: metrics.clone(),
        max_header_bytes: config.max_header_bytes,
        header_read_timeout: config.header_read_timeout,
        http1_fast_path: config.http1_fast_path,
    };
    let (stop, stopped) = watch::channel(false);
    // This thread serves its share of agent connections; each further worker is a thread with its
    // own event loop that serves the connections dealt to it, like nginx's worker processes.
    let workers = (1..config.worker_threads).map(|_| worker()).collect();
    proxy::set_max_sse_event(config.max_sse_event_bytes);
    let limits = mcp_credentials_core::listen::Limits {
        max_connections: config.admin_max_connections,
        header_read_timeout: config.admin_header_read_timeout,
        handshake_timeout: config.admin_header_read_timeout,
        idle_timeout: config.admin_header_read_timeout,
    };
    let probes = async {
        if let Some(listener) = probe_listener {
            serve_admin(listener, admin::probes(store.clone()), limits, stopped.clone()).await;
        }
    };
    // The browser extension's endpoints, and the status page's pointer to them.
    let mut browser_routes = None;
    if let StoreConfig::Standalone {
        credentials_file,
        secrets_dir,
        ..
    } = &config.store
    {
        let credentials = store::standalone::load(credentials_file)?;
        let ids = browser::extension_ids_from_env();
        if let Some(b) = browser::Browser::new(store.clone(), &credentials, secrets_dir, &ids)? {
            if config.admin_listen.ip().is_loopback() {
                tracing::info!(
                    page = %format!("http://{}/browser", config.admin_listen),
                    pairing_code_file = %b.code_file().display(),
                    credentials = ?b.credentials(),
                    "browser sessions: pair the mcp-credentials extension with the code in the file"
                );
                browser_routes = Some(b);
            } else {
                tracing::warn!(admin = %config.admin_listen, "browser sessions need the admin listener on loopback: the extension's endpoints are off");
            }
        }
    }
    let browser_sessions = browser_routes
        .as_ref()
        .map(|b| b.credentials())
        .unwrap_or_default();
    let mut admin_app = admin::app(store.clone(), metrics, sign_in_page, browser_sessions);
    if let Some(b) = browser_routes {
        admin_app = admin_app.merge(browser::routes(b));
    }
    let servers = futures_util::future::join3(
        serve_on(proxy_listener, proxy::app(proxy), stopped.clone(), workers),
        serve_admin(admin_listener, admin_app, limits, stopped.clone()),
        probes,
    );
    tokio::pin!(servers);
    tokio::select! {
        _ = &mut servers => {}
        () = shutdown => {
            tracing::info!(grace = ?config.shutdown_grace, "shutting down: finishing open requests");
            let _ = stop.send(true);
            if tokio::time::timeout(config.shutdown_grace, servers).await.is_err() {
                tracing::warn!("grace period over: closing the streams still open");
            }
        }
    }
    // A token request that may rotate a refresh token ends first: stopped before its answer is
    // saved, it would leave a spent refresh token on disk.
    if let Some(mut requests) = token_requests
        && requests.running() > 0
    {
        tracing::info!(
            running = requests.running(),
            "waiting for token requests to be answered and saved"
        );
        if tokio::time::timeout(TOKEN_REQUESTS_GRACE, requests.finished())
            .await
            .is_err()
        {
            tracing::warn!(
                running = requests.running(),
                "stopping with a token request unanswered: a refresh token it rotated is lost (sign in again if the next start says so)"
            );
        }
    }
    source.abort();
    Ok(())
}

/// How long shutting down waits for token requests that may rotate a refresh token: their own
/// timeout (15 s), plus saving the answer.
const TOKEN_REQUESTS_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves the proxy on `listener` until `stop` turns true, then waits for open connections. Each
/// connection starts on the HTTP/1.1 fast path (unless it is off) and moves to hyper (HTTP/1.1, or
/// HTTP/2 with prior knowledge) at the first request the fast path leaves to it; HTTP/1 connections
/// keep their own upstream connections on either path.
pub async fn serve(listener: TcpListener, app: proxy::App, stop: watch::Receiver<bool>) {
    serve_on(listener, app, stop, Vec::new()).await;
}

/// A thread with a single-threaded runtime of its own, serving the connections spawned on its handle
/// until the process exits.
fn worker() -> tokio::runtime::Handle {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a worker runtime starts");
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("proxy-worker".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .expect("a worker thread starts");
    handle
}

/// [`serve`], dealing connections in turn to this runtime and to each of `workers`. A connection
/// stays on the thread it was dealt to, with its upstream connection: no hand-offs between threads.
async fn serve_on(
    listener: TcpListener,
    app: proxy::App,
    mut stop: watch::Receiver<bool>,
    workers: Vec<tokio::runtime::Handle>,
) {
    let mut turn = 0;
    let header_read_timeout = app.0.header_read_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Slow-loris protection: a request head must arrive within the timeout (hyper's timer).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    let quiet = stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        // Small requests and SSE events go out at once instead of waiting for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        turn = (turn + 1) % (workers.len() + 1);
        let (builder, app) = (builder.clone(), app.clone());
        let waiting = Waiting {
            watcher: graceful.watcher(),
            stop: quiet.clone(),
            header_read_timeout,
        };
        let Some(worker) = workers.get(turn.wrapping_sub(1)) else {
            tokio::spawn(serve_connection(builder, waiting, app, tcp));
            continue;
        };
        // The socket moves to the worker's event loop, so its readiness wakes that thread only.
        let Ok(tcp) = tcp.into_std() else { continue };
        worker.spawn(async move {
            let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) else {
                return;
            };
            serve_connection(builder, waiting, app, tcp).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// What a new agent connection waits with for its first byte.
struct Waiting {
    watcher: Watcher,
    stop: watch::Receiver<bool>,
    header_read_timeout: std::time::Duration,
}

/// Serves one agent connection on the current runtime: on the HTTP/1.1 fast path while its requests
/// allow, then (or from the start, when the fast path is off) with hyper. A connection that sends
/// nothing at all within the header read timeout (or before shutdown) is closed before either looks
/// at it: hyper's own timeout starts only once it knows the connection is HTTP/1.
async fn serve_connection(
    builder: auto::Builder<TokioExecutor>,
    waiting: Waiting,
    app: proxy::App,
    tcp: tokio::net::TcpStream,
) {
    let Waiting {
        watcher,
        mut stop,
        header_read_timeout,
    } = waiting;
    let mut byte = [0; 1];
    tokio::select! {
        first = tokio::time::timeout(header_read_timeout, tcp.peek(&mut byte)) => {
            if !matches!(first, Ok(Ok(1..))) {
                return;
            }
        }
        _ = stop.wait_for(|s| *s) => return,
    }
    let io = if app.0.http1_fast_path {
        // The watcher stays alive meanwhile, so a graceful shutdown waits for this connection.
        match proxy::h1::serve(&app.0, tcp, &mut stop, header_read_timeout).await {
            proxy::h1::Exit::Closed => return,
            proxy::h1::Exit::Hyper { tcp, read } => Rewind { read, at: 0, tcp },
        }
    } else {
        Rewind {
            read: Vec::new(),
            at: 0,
            tcp,
        }
    };
    let (service, upstreams) = app.connection();
    let connection = builder.serve_connection(TokioIo::new(io), service).into_owned();
    if let Err(e) = upstreams.drive(watcher.watch(connection)).await {
        tracing::debug!(error = %e, "agent connection ended with an error");
    }
}

/// An agent connection handed from the fast path to hyper: the bytes the fast path read and did not
/// answer come first, then the socket.
struct Rewind {
    read: Vec<u8>,
    at: usize,
    tcp: tokio::net::TcpStream,
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.read.len() {
            let n = buf.remaining().min(this.read.len() - this.at);
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A failed accept: a connection reset before it was accepted is nothing; anything else (out of
/// file descriptors) is logged, and accepting pauses so the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// Serves the admin `app` on `listener` within `limits` until `stop` turns true, then waits for
/// open connections.
async fn serve_admin(
    listener: TcpListener,
    app: Router,
    limits: mcp_credentials_core::listen::Limits,
    mut stop: watch::Receiver<bool>,
) {
    use tower::ServiceExt as _;
    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        app.clone().oneshot(request)
    });
    let plain = |tcp| std::future::ready(Some(tcp));
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    mcp_credentials_core::listen::serve(listener, limits, plain, service, stopped).await;
}
