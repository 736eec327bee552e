//! JWKS fetching off the shard threads. STUB: being written.

/// The JWKS key cache shared by the shards.
pub struct JwksCache {}

impl JwksCache {
    /// Ask the fetcher to refetch now (an unknown `kid` was seen). `None` when it fetched less
    /// than 30 s ago: the caller refuses the token at once. Otherwise the receiver resolves when
    /// the fetch finished (successfully or not).
    pub fn request_refresh(&self) -> Option<futures_channel::oneshot::Receiver<()>> {
        None
    }
}
