//! The error responses an operation declares in its `responses(...)`, one type per status, each
//! with the shared error body (`ErrorBody`).
//!
//! A response's description lists the codes that [`ApiError::TABLE`] maps to its status, so the
//! document cannot drift from the error table. 500 (`internal`, a bug) is declared nowhere: a
//! client cannot act on it, and the fuzzing in `deploy/api-check.sh` treats it as a failure.

use std::collections::BTreeMap;

use utoipa::IntoResponses;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Ref, Type};
use utoipa::openapi::{ContentBuilder, RefOr};

use crate::error::ApiError;

/// The error body's schema name; `ApiDoc` registers the schema (an [`IntoResponses`] type does
/// not register what it refers to).
const ERROR_BODY: &str = "ErrorBody";

/// A response with the error body and a description naming every code of `status`.
fn error_response(status: u16, what: &str) -> Response {
    let codes: Vec<String> = ApiError::TABLE
        .iter()
        .filter(|(_, s)| *s == status)
        .map(|(code, _)| format!("`{code}`"))
        .collect();
    let mut response = ResponseBuilder::new()
        .description(format!("{what}: {}.", codes.join(", ")))
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(ERROR_BODY)))
                .build(),
        );
    if status == 401 {
        // The server challenges with every 401 (`ApiError::error_response`).
        response = response.header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .description(Some("`Bearer`"))
                .build(),
        );
    }
    response.build()
}

macro_rules! error_responses {
    ($($(#[$doc:meta])* $name:ident = $status:literal, $what:literal;)*) => {
        $(
            $(#[$doc])*
            pub struct $name;

            impl IntoResponses for $name {
                fn responses() -> BTreeMap<String, RefOr<Response>> {
                    BTreeMap::from([($status.to_string(), error_response($status, $what).into())])
                }
            }
        )*

        /// Every status above.
        #[cfg(test)]
        const DECLARED: &[u16] = &[$($status,)*];
    };
}

error_responses! {
    /// A malformed body, query parameter or id in the path, or a refused submission.
    BadRequest = 400, "The request is malformed or refused";
    /// No or an unknown bearer token (only when tokens are configured).
    Unauthorized = 401, "No or an unknown bearer token";
    /// The caller's token lacks the role, the name is another's, or a browser request from
    /// elsewhere (`api::browser`).
    Forbidden = 403, "Refused: the token lacks the role, the name belongs to someone else, or the request came through a browser from elsewhere";
    /// The id in the path names nothing.
    NotFound = 404, "Nothing by that id";
    /// The request conflicts with the current state.
    Conflict = 409, "The request conflicts with the current state";
    /// A body, or the event it would record, over its limit.
    PayloadTooLarge = 413, "Too large";
    /// A `Range` outside the blob.
    RangeNotSatisfiable = 416, "The range is outside the blob (`Content-Range: bytes */<length>`)";
    /// Too many long polls or event streams held, by the server or by this token.
    TooManyRequests = 429, "Too many waiting requests; retry when one ends";
    /// A module upload the server refused to register.
    Unprocessable = 422, "The module was refused";
    /// The log or blob store could not make a change durable; retry later.
    Unavailable = 503, "Nothing was recorded; retry later";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_of_the_error_table_but_internal_has_a_response() {
        for (code, status) in ApiError::TABLE {
            assert!(
                *status == 500 || DECLARED.contains(status),
                "`{code}` answers {status}, which no response type declares"
            );
        }
    }

    #[test]
    fn a_description_names_its_codes() {
        let responses = Conflict::responses();
        let RefOr::T(response) = &responses["409"] else {
            panic!("an inline response");
        };
        assert!(response.description.contains("`stale_epoch`"));
        assert!(response.description.contains("`experiment_exists`"));
        assert!(!response.description.contains("`not_found`"));
    }
}
