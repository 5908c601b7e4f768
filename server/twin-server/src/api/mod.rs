//! The HTTP API v1: one module per resource, each registering itself with `configure`.
//!
//! Routes are registered only through utoipa-actix-web's `service(...)`, which collects each
//! handler's `#[utoipa::path]` into the OpenAPI document, so the document cannot miss a route
//! (`tests/api.rs` also checks every route macro in this directory against it).

mod blobs;
pub mod browser;
mod events;
mod executors;
mod experiments;
mod jobs;
mod log;
mod models;
mod modules;
mod responses;
mod review;
mod system;
mod uploads;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, Error, HttpRequest, HttpResponse, error::JsonPayloadError, web};
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::service::Service;

#[derive(OpenApi)]
#[openapi(
    info(title = "twin", description = "Event-sourced job server for TWIN fine-grained perception training"),
    // Every error response refers to it (see `responses`), which registers nothing itself.
    components(schemas(twin_core::api::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

/// Raw bytes as a body's schema (`string`, format `binary`): what client generators read as a
/// file or byte string, where `Vec<u8>` would document an array of integers.
pub(crate) struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl utoipa::ToSchema for Binary {}

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub use uploads::UPLOAD_IDLE;

/// Limits applied to request bodies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_json_bytes: usize,
    pub max_blob_bytes: u64,
    /// Free space blob uploads leave on the blob store's file system (`storage_reserve_bytes`).
    pub storage_reserve_bytes: u64,
}

fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> Error {
    match err {
        JsonPayloadError::OverflowKnownLength { limit, .. }
        | JsonPayloadError::Overflow { limit } => ApiError::PayloadTooLarge {
            limit: limit as u64,
        }
        .into(),
        JsonPayloadError::ContentType => {
            ApiError::InvalidBody("body: send JSON with `Content-Type: application/json`".into())
                .into()
        }
        JsonPayloadError::Deserialize(e) => ApiError::InvalidBody(format!("body: {e}")).into(),
        other => ApiError::InvalidBody(format!("body: {other}")).into(),
    }
}

async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    // A fixed label set: any token in the request line would otherwise become a new series.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let metrics = req
        .app_data::<web::Data<Service>>()
        .map(|s| s.metrics.clone());
    let res = next.call(req).await?;
    if let Some(m) = metrics {
        m.http_seconds
            .with_label_values(&[method, &route, res.status().as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}

async fn no_route(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound {
        method: req.method().to_string(),
        path: req.path().chars().take(200).collect(),
    })
}

/// The OpenAPI document, built from the same registration as the routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, doc) = App::new()
        .into_utoipa_app()
        .openapi(ApiDoc::openapi())
        .configure(routes)
        .split_for_parts();
    doc
}

fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    system::configure_root(cfg);
    // One scope per prefix: actix does not fall through from a matched scope to a later one.
    cfg.service(
        utoipa_actix_web::scope("/v1")
            .configure(system::configure)
            .configure(jobs::configure)
            .configure(experiments::configure)
            .configure(events::configure)
            .configure(executors::configure)
            .configure(blobs::configure)
            .configure(uploads::configure)
            .configure(modules::configure)
            .configure(models::configure)
            .configure(review::configure)
            .configure(log::configure),
    );
}

/// The whole application, for `HttpServer` and for in-process tests.
pub fn app(
    service: Arc<Service>,
    auth: Arc<Auth>,
    limits: Limits,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = Error,
        InitError = (),
    >,
> {
    let (app, doc) = App::new()
        .into_utoipa_app()
        .openapi(ApiDoc::openapi())
        .configure(routes)
        .split_for_parts();
    app.app_data(web::Data::from(service))
        .app_data(web::Data::from(auth))
        .app_data(web::Data::new(doc))
        .app_data(web::Data::new(limits))
        .app_data(
            web::JsonConfig::default()
                .limit(limits.max_json_bytes)
                .error_handler(json_error),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::InvalidQuery(format!("query: {e}")).into()),
        )
        // Blob bodies are streamed (`web::Payload`, which this does not cap); this bounds the
        // buffered extractors, at the blob limit as before (saturating: `usize` is 64-bit here).
        .app_data(
            web::PayloadConfig::default()
                .limit(usize::try_from(limits.max_blob_bytes).unwrap_or(usize::MAX)),
        )
        .default_service(web::to(no_route))
        .wrap(from_fn(browser::guard))
        .wrap(from_fn(observe))
}
