//! Layer: refuse request targets that only a forward proxy would accept, and header sections larger
//! than the limit, before anything else looks at the request.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{Method, Version};

use super::Proxy;
use crate::error::ProxyError;

pub(super) async fn guard(State(proxy): State<Arc<Proxy>>, request: Request, next: Next) -> Response {
    // HTTP/2 always carries :authority, so only HTTP/1 absolute-form targets are refused. Either way the
    // target's authority is never used: the upstream comes from configuration alone.
    let http1 = matches!(
        request.version(),
        Version::HTTP_10 | Version::HTTP_11 | Version::HTTP_09
    );
    if request.method() == Method::CONNECT || (http1 && request.uri().authority().is_some()) {
        return ProxyError::NotAForwardProxy.into_response();
    }
    let size: usize = request
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if size > proxy.max_header_bytes {
        return ProxyError::HeadersTooLarge {
            limit: proxy.max_header_bytes,
        }
        .into_response();
    }
    next.run(request).await
}
