//! Defences against requests a web page makes through its visitor's browser.
//!
//! Bearer tokens are never sent by a browser on its own, so with tokens configured a page
//! elsewhere gets 401 whatever it sends. With auth off (the single-machine default, loopback
//! only) two doors stay open, and this middleware shuts them for every request:
//! - **DNS rebinding**: a page on `evil.example` whose name then resolves to 127.0.0.1 talks to
//!   the server as same-origin. Its requests carry `Host: evil.example`, so with auth off only
//!   loopback names and the configured `allowed_hosts` are served.
//! - **Cross-site simple requests**: a form or `fetch` POST with a CORS-safelisted content type
//!   (`text/plain`, a form encoding) or no body needs no preflight. A mutating request on `/v1`
//!   must therefore carry a content type a browser only sends after a preflight (this server
//!   answers none), or, without a body, a header that does the same (`X-Twin-Client`, any
//!   value; `Authorization` and tus's `Tus-Resumable` count too). A browser's `Origin` naming
//!   another host than the request's is refused outright.
//!
//! A web console serving HTML forms (later) will rely on CSRF tokens and the same Origin check.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::middleware::Next;
use actix_web::{Error, ResponseError, web};

use crate::auth::Auth;
use crate::error::ApiError;

/// The header the `twin` client sends on every request; any value will do.
pub const CLIENT_HEADER: &str = "x-twin-client";

/// Headers a browser sends cross-site only after a CORS preflight: their presence proves the
/// request is not a simple one.
const PREFLIGHTED_HEADERS: &[&str] = &[CLIENT_HEADER, "authorization", "tus-resumable"];

/// The content types a cross-site page may POST without a preflight (the Fetch standard's
/// CORS-safelisted request header values).
const SIMPLE_CONTENT_TYPES: &[&str] = &[
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/plain",
];

/// Whether `host` (a `Host` header: a name or address and an optional port) names this machine's
/// loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The name or address of a `Host` value, without its port (`[::1]:7878` → `[::1]`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    }
}

/// Refuses what a page elsewhere could make a browser send (see the module's documentation).
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    if let Err(e) = check(&req) {
        let refused = e.error_response();
        return Ok(req.into_response(refused).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn check(req: &ServiceRequest) -> Result<(), ApiError> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let (Some(auth), Some(host)) = (req.app_data::<web::Data<Auth>>(), host.as_deref())
        && auth.is_open()
        && !is_loopback_host(host)
        && !auth
            .allowed_hosts()
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host_name(host)))
    {
        return Err(ApiError::HostNotAllowed(host.chars().take(100).collect()));
    }
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    // An unknown route changes nothing: its 404 says more than a refusal would.
    if !mutating || !req.path().starts_with("/v1/") || req.match_pattern().is_none() {
        return Ok(());
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        // `null` (a sandboxed or file page) and any other site are both foreign.
        let origin_host = origin.split_once("://").map(|(_, rest)| rest);
        if origin_host.is_none() || origin_host != host.as_deref() {
            return Err(ApiError::CrossOrigin(origin.chars().take(100).collect()));
        }
    }
    if *req.method() == Method::POST {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let preflighted = PREFLIGHTED_HEADERS.iter().any(|h| headers.contains_key(*h));
        match content_type {
            Some(c) if SIMPLE_CONTENT_TYPES.contains(&c.as_str()) => {
                return Err(ApiError::InvalidBody(format!(
                    "Content-Type: `{c}` is what any web page may send; send \
                     `application/json`"
                )));
            }
            None if !preflighted => {
                return Err(ApiError::InvalidBody(format!(
                    "a POST without a body must carry the header `{CLIENT_HEADER}` (any value), \
                     which a web page cannot send without asking first"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_with_and_without_ports() {
        for h in [
            "localhost",
            "localhost:7878",
            "LOCALHOST",
            "twin.localhost:1",
            "127.0.0.1",
            "127.0.0.1:7878",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:7878",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:7878",
            "localhost.evil.example",
            "10.0.0.1:7878",
            "[::2]:7878",
            "",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
        assert_eq!(host_name("[::1]:7878"), "[::1]");
        assert_eq!(host_name("twin.lab:7878"), "twin.lab");
    }
}
