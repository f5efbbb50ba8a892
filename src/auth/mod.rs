//! Authentication and authorisation (SPEC §8): where signed tokens will be checked.
//!
//! Owns (once built): verifying a request's token (`Authorization: Bearer` or `?token=`)
//! against the key files, and deciding whether its grants cover the path, before the
//! upgrade or the `POST`. `server::http` calls it between the channel mapping and the 101;
//! a token's expiry becomes one more deadline of the session's open phase.
//! Must not: touch Redis or a connection after its upgrade; it answers yes or no (401/403).
