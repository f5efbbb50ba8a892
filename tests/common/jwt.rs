//! Tokens for the tests of SPEC §8's callers (client, live page, Pi example), minted here with
//! the `jsonwebtoken` crate, independently of `lightrelay token`, and the secret file the
//! servers verify them with. Included with `#[path = "common/jwt.rs"] mod jwt;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

/// The HS256 secret the tests' servers are given.
pub const SECRET: &str = "test-secret-of-the-callers-tests-0123456789";

/// A secret file (`--jwt-secret-file`) holding [`SECRET`], in `dir`.
pub fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("jwt-secret");
    std::fs::write(&path, format!("# the tests' key\n{SECRET}\n")).unwrap();
    path
}

/// An HS256 token signed with `secret`, granting `pub` and `sub` patterns, valid for an hour.
pub fn token_with(secret: &str, publish: &[&str], subscribe: &[&str]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "lightrelay": { "pub": publish, "sub": subscribe },
        "exp": now + 3600,
    });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token signed with [`SECRET`].
pub fn token(publish: &[&str], subscribe: &[&str]) -> String {
    token_with(SECRET, publish, subscribe)
}
