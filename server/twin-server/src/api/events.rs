//! The event stream: pages with long polling, and Server-Sent Events.

use std::time::Duration;

use actix_web::{HttpResponse, get, web};
use bytes::Bytes;
use serde::Deserialize;
use twin_core::api::EventsPage;

use crate::api::responses::{BadRequest, Forbidden, TooManyRequests, Unauthorized};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(events_page).service(stream);
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    /// First sequence number wanted (default 1).
    from: Option<u64>,
    /// Only streams starting with this, e.g. `job/` or `job/01j…`.
    prefix: Option<String>,
    /// At most this many events (default 500, at most 5 000).
    limit: Option<usize>,
    /// Long poll: wait up to this long for an event when there is none (at most 60 000).
    wait_ms: Option<u64>,
}

/// A page of events in sequence order; `next` continues it.
#[utoipa::path(
    tag = "events",
    operation_id = "events_page",
    params(PageQuery),
    responses((status = 200, body = EventsPage), BadRequest, Unauthorized, Forbidden, TooManyRequests)
)]
#[get("/events")]
async fn events_page(
    caller: Caller,
    svc: web::Data<Service>,
    q: web::Query<PageQuery>,
) -> Result<web::Json<EventsPage>, ApiError> {
    caller.require(Role::Read)?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(60_000));
    let _slot = if wait.is_zero() {
        None
    } else {
        Some(svc.waiters.acquire(&caller)?)
    };
    let limit = q.limit.unwrap_or(500).clamp(1, 5_000);
    svc.events(q.from.unwrap_or(1), q.prefix.as_deref(), limit, wait)
        .await
        .map(web::Json)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    /// First sequence number wanted (default: only new events).
    from: Option<u64>,
    prefix: Option<String>,
}

/// Server-Sent Events: `id` is the sequence number, `event` the type, `data` the event as JSON.
/// A comment line is sent every 15 s of quiet to keep proxies from closing the stream.
#[utoipa::path(
    tag = "events",
    operation_id = "events_stream",
    params(StreamQuery),
    responses(
        (status = 200, content_type = "text/event-stream", body = String),
        BadRequest, Unauthorized, Forbidden, TooManyRequests
    )
)]
#[get("/events/stream")]
async fn stream(
    caller: Caller,
    svc: web::Data<Service>,
    q: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    // Held by the task that feeds the stream, so freed when the client goes away.
    let slot = svc.waiters.acquire(&caller)?;
    let svc = svc.into_inner();
    let from = q.from.unwrap_or_else(|| svc.last_seq() + 1);
    let prefix = q.prefix.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let _slot = slot;
        let mut from = from;
        loop {
            let page = match svc
                .events(from, prefix.as_deref(), 500, Duration::from_secs(15))
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx
                        .send(Bytes::from(format!("event: error\ndata: {e}\n\n")))
                        .await;
                    return;
                }
            };
            from = page.next;
            if page.events.is_empty()
                && tx
                    .send(Bytes::from_static(b": keep-alive\n\n"))
                    .await
                    .is_err()
            {
                return;
            }
            for e in page.events {
                let data = serde_json::to_string(&e).expect("events serialise");
                let frame = format!(
                    "id: {}\nevent: {}\ndata: {data}\n\n",
                    e.seq,
                    e.event.event_type()
                );
                if tx.send(Bytes::from(frame)).await.is_err() {
                    return; // the client went away
                }
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, actix_web::Error>(b), rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body))
}
