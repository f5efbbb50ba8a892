//! `lightrelay token`: mint one signed token (SPEC §8) for a device or a reader.
//!
//! Owns: building the claims (`lightrelay.pub/sub/down`, `exp` from `--ttl`, `iss`, `aud`)
//! and signing them with a secret of the server's secret file (HS256) or a private key
//! (RS256, ES256, EdDSA by the key's type). Must not: talk to a server, or print anything
//! but the token on stdout (errors: one line on stderr).

use std::process::ExitCode;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::args::TokenArgs;
use crate::auth::keys;

#[derive(Serialize)]
struct Claims<'a> {
    lightrelay: Grants<'a>,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

#[derive(Serialize)]
struct Grants<'a> {
    #[serde(rename = "pub", skip_serializing_if = "<[_]>::is_empty")]
    publish: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    sub: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    down: &'a [String],
}

/// Print the token; exit 2 for a bad key or kid, like a bad flag.
pub fn run(args: TokenArgs) -> ExitCode {
    match mint(&args) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("lightrelay token: {why}");
            ExitCode::from(2)
        }
    }
}

/// The signed token the flags describe.
pub(crate) fn mint(args: &TokenArgs) -> Result<String, String> {
    if args.publish.is_empty() && args.sub.is_empty() && args.down.is_empty() {
        return Err("the token would grant nothing: give --pub, --sub or --down patterns".into());
    }
    let (mut header, key) = signing_key(args)?;
    if header.kid.is_none() {
        header.kid = args.kid.clone();
    }
    let now = crate::auth::unix_now();
    let claims = Claims {
        lightrelay: Grants {
            publish: &args.publish,
            sub: &args.sub,
            down: &args.down,
        },
        iat: now,
        exp: args.ttl.0.map(|ttl| now.saturating_add(ttl.as_secs())),
        iss: args.issuer.as_deref(),
        aud: args.audience.as_deref(),
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("cannot sign: {e}"))
}

/// The header (algorithm, and the kid a secret's label gives) and the key to sign with.
fn signing_key(args: &TokenArgs) -> Result<(Header, EncodingKey), String> {
    if let Some(path) = &args.private_key_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read --private-key-file {}: {e}", path.display()))?;
        let (algorithm, key) = if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
            (Algorithm::ES256, key)
        } else if let Ok(key) = EncodingKey::from_ed_pem(&pem) {
            (Algorithm::EdDSA, key)
        } else if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
            (Algorithm::RS256, key)
        } else {
            return Err(format!(
                "--private-key-file {} is not a PEM private key (RSA, P-256 EC or Ed25519, PKCS#8)",
                path.display()
            ));
        };
        return Ok((Header::new(algorithm), key));
    }
    let Some(path) = &args.secret_file else {
        return Err("give --secret-file (HS256) or --private-key-file".into());
    };
    let secrets = keys::read_secret_file(path)
        .map_err(|e| e.replace("--jwt-secret-file", "--secret-file"))?;
    let secret = match &args.kid {
        Some(kid) => secrets
            .into_iter()
            .find(|s| s.label.as_deref() == Some(kid.as_str()))
            .ok_or_else(|| format!("no line of {} is labelled '{kid}'", path.display()))?,
        // The first secret: the one a rotation puts first, the newest.
        None => secrets
            .into_iter()
            .next()
            .expect("read_secret_file refuses an empty file"),
    };
    let mut header = Header::new(Algorithm::HS256);
    header.kid = secret.label;
    Ok((header, EncodingKey::from_secret(&secret.secret)))
}
