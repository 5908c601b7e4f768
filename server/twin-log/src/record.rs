//! The log's side of a record: sled's entries through twin-core's record format
//! (`twin_core::record`: the stored bytes, the hash and the chain check, pure and fuzzed).

pub use twin_core::record::{
    ChainError, GENESIS_HASH, Idempotency, StoredRecord, decode, key, verify_chain,
};

/// Walks sled's `(key, value)` pairs in key order, checking each record and its link to the
/// one before.
pub(crate) fn verified<I>(iter: I) -> impl Iterator<Item = Result<StoredRecord, ChainError>>
where
    I: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
{
    verify_chain(iter.map(|kv| {
        kv.map_err(|e| ChainError::Storage {
            message: e.to_string(),
        })
    }))
}

/// Builds the [`crate::NewEvent`] of a schema event for a stream.
pub fn new_event(stream: &twin_core::StreamName, event: &twin_core::Event) -> crate::NewEvent {
    use twin_core::EventSchema;
    let (event_type, schema_version, payload) = event.encode();
    crate::NewEvent {
        stream: stream.to_string(),
        event_type: event_type.to_owned(),
        schema_version,
        payload,
    }
}
