//! The proxy: one handler that runs the steps below in order, served by hyper directly (one match,
//! no router or middleware stack on the hot path). Each step lives in its own module.
//!
//! 1. [`guard`]: refuse forward-proxy targets, foreign Host/Origin and oversized headers.
//! 2. [`route`]: `/<credential>/<rest>` to `<upstream>/<rest>`; the only place an upstream URI is made.
//! 3. [`strip`]: strip whatever credential the agent sent (no token passthrough), on every method.
//! 4. [`attach`]: attach the current credential, or answer 503 when it is missing or expired.
//! 5. [`forward`]: send the request upstream and stream the answer back.
//! 6. [`measure`]: count every answer, the sidecar's own refusals included.
//!
//! [`h1`] runs the same steps on raw HTTP/1.1 bytes for ordinary requests to plain-http upstreams,
//! and hands everything else to this path.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{Request, Version};
use http_body::Body as _;

use crate::{metrics::Metrics, store::Store};

mod attach;
mod forward;
mod guard;
pub(crate) mod h1;
mod measure;
mod own;
mod replay;
mod route;
mod sse;
mod strip;
mod tls;

pub use forward::{ClientError, ClientSettings, UpstreamClient, UpstreamError, upstream_client};
pub use replay::set_wait as set_replay_wait;
use route::Routed;
pub use sse::set_max_event as set_max_sse_event;

/// What every request shares.
pub struct Proxy {
    /// The current credentials.
    pub store: Arc<Store>,
    /// The upstream client.
    pub client: UpstreamClient,
    /// The sidecar's metrics.
    pub metrics: Metrics,
    /// The largest request header section accepted, in bytes.
    pub max_header_bytes: usize,
    /// How long an agent connection may take to send a request head (see
    /// [`HEADER_READ_TIMEOUT`](crate::config::HEADER_READ_TIMEOUT)); used by [`crate::serve`].
    pub header_read_timeout: std::time::Duration,
    /// Whether HTTP/1.1 agent connections start on the fast path ([`h1`]); used by [`crate::serve`].
    pub http1_fast_path: bool,
}

/// The proxy, cheap to clone. Serve it with [`crate::serve`] (each agent connection then keeps its
/// own upstream connection), or call it as a `tower::Service` (every request uses the shared pool).
#[derive(Clone)]
pub struct App(pub(crate) Arc<Proxy>);

/// Builds the proxy.
pub fn app(proxy: Proxy) -> App {
    App(Arc::new(proxy))
}

/// What one agent connection keeps between its requests: its own upstream connections and the
/// metric handles of the credential it used last, so neither is looked up again on every request.
#[derive(Default)]
pub(crate) struct Local {
    upstream: Vec<forward::Own>,
    /// The connections behind `upstream` (and any still finishing a response): driven by the agent
    /// connection's own task, see [`Upstreams::drive`].
    driving: Vec<forward::OwnConnection>,
    /// A connection joined `driving` since the driver last looked.
    opened: bool,
    handles: Option<Arc<measure::Handles>>,
}

/// The upstream connections of one agent connection, driven by that connection's task: a request
/// and its answer pass between the two connections without waking another task.
pub struct Upstreams(Arc<Mutex<Local>>);

/// Which side of a driven agent connection was woken, so that each poll polls only that side.
#[derive(Default)]
struct Woken {
    task: futures_util::task::AtomicWaker,
    /// Inside the task's poll: a wake only marks its side, the poll loop sees it.
    polling: std::sync::atomic::AtomicBool,
    agent: std::sync::atomic::AtomicBool,
    upstream: std::sync::atomic::AtomicBool,
}

struct Side(Arc<Woken>, bool);

impl std::task::Wake for Side {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        let side = if self.1 { &self.0.agent } else { &self.0.upstream };
        side.store(true, SeqCst);
        if !self.0.polling.load(SeqCst) {
            self.0.task.wake();
        }
    }
}

impl Upstreams {
    /// Runs `agent` (the agent connection) to its end, driving the upstream connections it opens
    /// alongside it; they close when it ends.
    pub async fn drive<F: Future>(self, agent: F) -> F::Output {
        use std::sync::atomic::Ordering::SeqCst;
        let mut agent = std::pin::pin!(agent);
        let woken = Arc::new(Woken::default());
        woken.agent.store(true, SeqCst);
        let agent_waker = std::task::Waker::from(Arc::new(Side(woken.clone(), true)));
        let upstream_waker = std::task::Waker::from(Arc::new(Side(woken.clone(), false)));
        std::future::poll_fn(move |cx| {
            woken.task.register(cx.waker());
            woken.polling.store(true, SeqCst);
            for _ in 0..8 {
                let mut polled = false;
                if woken.upstream.swap(false, SeqCst) {
                    polled = true;
                    self.poll_upstream(&mut Context::from_waker(&upstream_waker));
                }
                if woken.agent.swap(false, SeqCst) {
                    polled = true;
                    if let Poll::Ready(done) = agent.as_mut().poll(&mut Context::from_waker(&agent_waker)) {
                        woken.polling.store(false, SeqCst);
                        return Poll::Ready(done);
                    }
                    // An upstream connection the agent connection just opened is polled now.
                    if std::mem::take(&mut self.0.lock().expect("connection state").opened) {
                        woken.upstream.store(true, SeqCst);
                    }
                }
                if !polled {
                    break;
                }
            }
            woken.polling.store(false, SeqCst);
            // Woken after the last look (or the loop's bound reached): poll again soon.
            if woken.agent.load(SeqCst) || woken.upstream.load(SeqCst) {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    }

    fn poll_upstream(&self, cx: &mut Context<'_>) {
        let mut local = self.0.lock().expect("connection state");
        local.driving.retain_mut(|c| match Pin::new(c).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(Ok(())) => false,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upstream connection closed");
                false
            }
        });
    }
}

impl App {
    /// Answers one request of an agent connection. `local` is `None` for requests that must not
    /// be tied to one upstream connection (HTTP/2 agent connections multiplex their requests).
    async fn answer(self, local: Option<Arc<Mutex<Local>>>, request: Request<Body>) -> Response {
        let proxy = &*self.0;
        let cached = local
            .as_ref()
            .and_then(|l| l.lock().expect("connection state").handles.clone());
        // The credential's handles once the request is routed; unrouted answers count under no name.
        let mut used = None;
        let response = match handle(proxy, local.as_deref(), cached, &mut used, request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        measure::count(proxy, used.as_deref(), response.status());
        if let (Some(local), Some(used)) = (local, used) {
            local.lock().expect("connection state").handles = Some(used);
        }
        response
    }

    /// A hyper service for one agent connection, and its upstream connections, which must be driven
    /// alongside the agent connection ([`Upstreams::drive`]).
    pub fn connection(
        &self,
    ) -> (
        impl hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response,
            Error = Infallible,
            Future = impl Future<Output = Result<Response, Infallible>> + Send + 'static,
        > + Clone
        + Send
        + 'static,
        Upstreams,
    ) {
        let app = self.clone();
        let local = Arc::new(Mutex::new(Local::default()));
        let upstreams = Upstreams(local.clone());
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let app = app.clone();
            // HTTP/1 requests of one connection come one after the other: they can share one upstream
            // connection. HTTP/2 streams run side by side (an SSE stream next to POSTs): pool them.
            let local =
                matches!(request.version(), Version::HTTP_10 | Version::HTTP_11).then(|| local.clone());
            // Most requests (GET, DELETE) have no body: nothing to box.
            let request = request.map(|b| match b.is_end_stream() {
                true => Body::empty(),
                false => Body::new(b),
            });
            async move { Ok(app.answer(local, request).await) }
        });
        (service, upstreams)
    }
}

impl tower::Service<Request<Body>> for App {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let app = self.clone();
        Box::pin(async move { Ok(app.answer(None, request).await) })
    }
}

/// The steps, in order. Every refusal is a [`ProxyError`](crate::error::ProxyError) answer.
async fn handle(
    proxy: &Proxy,
    local: Option<&Mutex<Local>>,
    cached: Option<Arc<measure::Handles>>,
    used: &mut Option<Arc<measure::Handles>>,
    mut request: Request<Body>,
) -> Result<Response, crate::error::ProxyError> {
    guard::guard(proxy, &request)?;
    let routed = route::route(proxy, request.uri(), cached)?;
    let handles = used.insert(routed.handles.clone());
    strip::strip(request.headers_mut());
    let credential = attach::attach(proxy, &routed, request.headers_mut())?;
    Ok(forward::forward(proxy, local, handles, routed, credential, request).await)
}

#[cfg(test)]
mod tests;
