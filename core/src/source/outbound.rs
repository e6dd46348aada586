//! Outbound safety for URLs the operator did not get from its user but learned from a server
//! (protected resource metadata, authorization server metadata, `WWW-Authenticate`): such a URL
//! may point anywhere, so before anything is sent to it, and again at every redirect and at every
//! DNS answer, it must be https (loopback only by explicit opt-in) and must not reach a link-local
//! or cloud metadata address. Every response body is read with a size limit and a deadline.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// How many redirects a metadata request follows, each re-checked. Real servers use one at most
/// (a trailing slash, http to https); more is a loop or a trick.
const MAX_REDIRECTS: usize = 3;

/// Host names of cloud instance metadata services, refused whatever they resolve to.
const METADATA_HOSTS: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.com",
    "metadata.platformequinix.com",
];

/// Cloud metadata and host-agent addresses outside the link-local ranges (those are refused whole).
const METADATA_ADDRESSES: &[IpAddr] = &[
    // AWS IMDS over IPv6 (Nitro).
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
    // Alibaba Cloud.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // Azure WireServer.
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    // Oracle Cloud.
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
];

/// Which destinations a learned URL may have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    /// Allow loopback destinations (and plain http to them). For tests and local development;
    /// never needed in a cluster. Default: false.
    pub allow_loopback: bool,
}

/// Why a learned URL may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a URL at all.
    #[error("not an absolute URL")]
    Invalid,
    /// A scheme other than https (http only to loopback with the opt-in).
    #[error("{0}:// is not allowed (https only)")]
    Scheme(String),
    /// User name or password in the URL.
    #[error("a user name or password in the URL is not allowed")]
    Credentials,
    /// A host name of a cloud metadata service.
    #[error("{0} is a cloud metadata service")]
    MetadataHost(String),
    /// An address that is never a legitimate authorization server.
    #[error("{addr} is {what}")]
    Address {
        /// The address (as written or as resolved).
        addr: IpAddr,
        /// What kind of address it is.
        what: &'static str,
    },
}

/// Checks a learned URL before anything is sent to it. Addresses the host name resolves to are
/// checked again at connection time by [`guarded_client`]'s resolver.
pub fn check_url(url: &str, policy: OutboundPolicy) -> Result<reqwest::Url, Refused> {
    let u = reqwest::Url::parse(url).map_err(|_| Refused::Invalid)?;
    check(&u, policy)?;
    Ok(u)
}

fn check(u: &reqwest::Url, policy: OutboundPolicy) -> Result<(), Refused> {
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Refused::Credentials);
    }
    let raw = u.host_str().filter(|h| !h.is_empty()).ok_or(Refused::Invalid)?;
    let host = match raw
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(raw.trim_end_matches('.').to_ascii_lowercase()),
    };
    // The destination first: its refusal is the most useful message.
    let loopback = match &host {
        Host::Name(n) if METADATA_HOSTS.contains(&n.as_str()) => {
            return Err(Refused::MetadataHost(n.clone()));
        }
        Host::Name(n) => n == "localhost" || n.ends_with(".localhost"),
        Host::Ip(ip) => {
            check_ip(*ip, policy)?;
            canonical(*ip).is_loopback()
        }
    };
    if loopback && !policy.allow_loopback {
        return Err(Refused::Address {
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            what: "a loopback address (allowed only with the loopback opt-in)",
        });
    }
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        other => Err(Refused::Scheme(other.to_owned())),
    }
}

enum Host {
    Name(String),
    Ip(IpAddr),
}

/// An IPv4-mapped or IPv4-compatible IPv6 address as the IPv4 address it reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a destination address may be connected to.
pub fn check_ip(ip: IpAddr, policy: OutboundPolicy) -> Result<(), Refused> {
    let refuse = |what| Err(Refused::Address { addr: ip, what });
    let c = canonical(ip);
    if METADATA_ADDRESSES.contains(&c) || METADATA_ADDRESSES.contains(&ip) {
        return refuse("a cloud metadata address");
    }
    if c.is_loopback() {
        return if policy.allow_loopback {
            Ok(())
        } else {
            refuse("a loopback address (allowed only with the loopback opt-in)")
        };
    }
    match c {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                refuse("a link-local address (169.254.0.0/16, where cloud metadata services live)")
            } else if v4.is_unspecified() || v4.octets()[0] == 0 {
                refuse("an unspecified address (0.0.0.0/8 reaches this host)")
            } else if v4.is_broadcast() || v4.is_multicast() {
                refuse("a broadcast or multicast address")
            } else {
                Ok(())
            }
        }
        IpAddr::V6(v6) => {
            if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                refuse("a link-local address (fe80::/10)")
            } else if v6.is_unspecified() {
                refuse("an unspecified address")
            } else if v6.is_multicast() {
                refuse("a multicast address")
            } else {
                Ok(())
            }
        }
    }
}

/// A DNS resolver that refuses a name when any address it resolves to is refused: the checked
/// addresses are exactly the ones connected to, so a second DNS answer (rebinding) cannot slip
/// a metadata address in between the check and the connection.
struct GuardedResolver {
    policy: OutboundPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let lower = host.trim_end_matches('.').to_ascii_lowercase();
            if METADATA_HOSTS.contains(&lower.as_str()) {
                return Err(
                    Box::new(Refused::MetadataHost(lower)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for a in &addrs {
                check_ip(a.ip(), policy)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The client for learned URLs: every DNS answer checked, bounded connect and total time. With
/// `follow_redirects` (metadata GETs), every redirect is re-checked, at most [`MAX_REDIRECTS`];
/// without (token requests), none is followed: a 307 must not replay a secret to another host.
pub fn guarded_client(
    timeout: Duration,
    policy: OutboundPolicy,
    follow_redirects: bool,
) -> reqwest::Result<reqwest::Client> {
    let redirects = if follow_redirects {
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match check(attempt.url(), policy) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(format!("redirected to a refused URL: {e}")),
            }
        })
    } else {
        reqwest::redirect::Policy::none()
    };
    reqwest::Client::builder()
        .redirect(redirects)
        .dns_resolver(Arc::new(GuardedResolver { policy }))
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .user_agent(concat!("mcp-credentials/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Why a response could not be read in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The body is larger than allowed.
    #[error("the response is larger than {0} bytes")]
    TooLarge(usize),
    /// The body could not be read (the deadline passed, the connection broke).
    #[error("{0}")]
    Failed(String),
}

/// Reads a response body, refusing more than `max` bytes. A `Content-Length` above the limit is
/// refused before anything is read; the client's deadline bounds a slow body.
pub async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(ReadError::TooLarge(max));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| ReadError::Failed(describe(&e)))? {
        if bytes.len() + chunk.len() > max {
            return Err(ReadError::TooLarge(max));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Why a request failed, in words that hold no URL query (reqwest's messages include the URL),
/// naming the refused destination when the guard stopped it.
pub fn describe(e: &reqwest::Error) -> String {
    if let Some(refused) = find_cause::<Refused>(e) {
        return format!("refused: {refused}");
    }
    if e.is_redirect() {
        // The policy's own message ("redirected to a refused URL: ...") is the useful part.
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if s.source().is_none() {
                return s.to_string();
            }
            source = s.source();
        }
        return "too many redirects".into();
    }
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else if e.is_body() || e.is_decode() {
        "the response body could not be read".into()
    } else {
        let mut msg = e.to_string();
        if let Some(u) = e.url() {
            msg = msg.replace(u.as_str(), &label(u));
        }
        msg
    }
}

/// True when the guard refused the destination (at resolution or at a redirect): not transient.
pub fn refused(e: &reqwest::Error) -> bool {
    e.is_redirect() || find_cause::<Refused>(e).is_some()
}

fn find_cause<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// Scheme, host, port and path of a URL: what may appear in messages, status and metric labels.
pub fn label(u: &reqwest::Url) -> String {
    format!(
        "{}://{}{}{}",
        u.scheme(),
        u.host_str().unwrap_or(""),
        u.port().map(|p| format!(":{p}")).unwrap_or_default(),
        u.path()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: OutboundPolicy = OutboundPolicy {
        allow_loopback: false,
    };
    const LOOPBACK: OutboundPolicy = OutboundPolicy { allow_loopback: true };

    #[test]
    fn https_to_a_public_name_is_allowed() {
        assert!(check_url("https://login.example.com/oauth2/token", STRICT).is_ok());
        assert!(
            check_url("https://10.0.0.7/token", STRICT).is_ok(),
            "in-cluster IdPs are common"
        );
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback_with_the_opt_in() {
        assert_eq!(
            check_url("http://login.example.com/token", LOOPBACK),
            Err(Refused::Scheme("http".into()))
        );
        assert!(check_url("http://127.0.0.1:8080/token", STRICT).is_err());
        assert!(check_url("http://127.0.0.1:8080/token", LOOPBACK).is_ok());
        assert!(check_url("http://[::1]:8080/token", LOOPBACK).is_ok());
        assert!(check_url("https://localhost/token", STRICT).is_err());
        assert!(check_url("file:///etc/passwd", LOOPBACK).is_err());
    }

    #[test]
    fn metadata_and_link_local_addresses_are_refused_whatever_the_opt_in() {
        for url in [
            "https://169.254.169.254/latest/meta-data/",
            "https://169.254.170.2/v2/credentials",
            "https://[fe80::1]/",
            "https://[fd00:ec2::254]/",
            "https://[::ffff:169.254.169.254]/",
            "https://100.100.100.200/",
            "https://168.63.129.16/",
            "https://metadata.google.internal/computeMetadata/v1/",
            "https://METADATA.google.internal./",
            "https://0.0.0.0/",
            "https://[::]/",
        ] {
            assert!(check_url(url, LOOPBACK).is_err(), "{url} must be refused");
        }
        let e = check_url("https://169.254.169.254/", STRICT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("169.254.169.254") && e.contains("link-local"), "{e}");
    }

    #[test]
    fn user_info_in_a_learned_url_is_refused() {
        assert_eq!(
            check_url("https://user:pw@login.example.com/", STRICT),
            Err(Refused::Credentials)
        );
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_connection_time() {
        // `localhost.` is caught by name; a name that resolves to 127.0.0.1 is caught by address.
        let r = GuardedResolver { policy: STRICT };
        let e = match r.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost resolved through the guard"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("loopback"), "{e}");
        let ok = GuardedResolver { policy: LOOPBACK };
        assert!(ok.resolve("localhost".parse().unwrap()).await.is_ok());
    }
}
