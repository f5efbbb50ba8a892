//! Authentication and authorisation (SPEC §8): signed tokens and what they grant.
//!
//! Owns: [`Auth`], built once per process from the flags: which requests need a token
//! (`--auth`), the keys (re-read by [`Auth::reload`] on SIGHUP, swapped whole so a request
//! sees the old set or the new one), verifying a token (signature with the key its `kid` or
//! its algorithm picks, `exp`, `nbf`, `iss`, `aud`) and deciding whether its grants cover a
//! path; finding the token in a request (`Authorization: Bearer`, or `?token=`); and the
//! refusal (401 or 403, a one-line reason, a metric label) when it does not. `server::http`
//! asks it before a 101 or a `POST` publish; the session closes a connection at the `exp` it
//! returns.
//! Must not: touch Redis or a connection, log a token, or keep a token's claims beyond what
//! the checks need (an expiry and a yes/no per grant).

pub(crate) mod glob;
pub(crate) mod keys;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::{self, HeaderMap};
use hyper::StatusCode;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use keys::KeySet;

/// Signed tokens (SPEC §8): who needs one and which keys verify it.
#[derive(clap::Args, Debug, Clone)]
pub struct AuthArgs {
    /// Who needs a token: nobody, publishers (every way of publishing), or everyone.
    #[arg(long, env = "LIGHTRELAY_AUTH", value_enum, default_value_t = AuthMode::None)]
    pub auth: AuthMode,

    /// HS256 secrets, one per line, as `SECRET` or `LABEL:SECRET` (the label is a token's
    /// `kid`); re-read on SIGHUP. (An empty value means none.)
    #[arg(long, env = "LIGHTRELAY_JWT_SECRET_FILE", value_name = "FILE", value_parser = parse_path)]
    pub jwt_secret_file: Option<PathBuf>,

    /// A PEM public key (RS256, ES256 or EdDSA); repeatable, or comma-separated in the
    /// environment. Its file name without the extension is its `kid`. Re-read on SIGHUP.
    #[arg(long, env = "LIGHTRELAY_JWT_PUBLIC_KEY_FILE", value_name = "FILE",
          value_delimiter = ',', value_parser = parse_path)]
    pub jwt_public_key_file: Vec<PathBuf>,

    /// When set, a token's `iss` must be this.
    #[arg(long, env = "LIGHTRELAY_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,

    /// When set, a token's `aud` must name this.
    #[arg(long, env = "LIGHTRELAY_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,
}

/// `--auth`: what needs a token.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Nothing: anyone who reaches the relay publishes and subscribes.
    None,
    /// Publishing (WebSocket, POST, --accept-publish frames, downlink) needs a `pub` grant.
    Publish,
    /// Publishing needs a `pub` grant and subscribing a `sub` grant.
    All,
}

/// A path, empty allowed (an environment file may hold an empty value: no file).
fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(s.into())
}

/// Why a token check refused a request (`lightrelay_auth_refused_total{reason}`): 401 for all
/// but `forbidden` (403).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum AuthRefusal {
    /// No token where one is needed.
    missing,
    /// Not a JWT, a header of another scheme, an unknown or `none` algorithm, bad claims.
    malformed,
    /// No key verifies its signature (or none has its algorithm).
    bad_signature,
    /// Its `kid` names no key.
    unknown_kid,
    /// Past its `exp`.
    expired,
    /// Before its `nbf`.
    not_yet_valid,
    /// `iss` is not `--jwt-issuer`.
    wrong_issuer,
    /// `aud` does not name `--jwt-audience`.
    wrong_audience,
    /// Valid, but its grants do not cover the path.
    forbidden,
}

/// How far a token's `nbf` may lie in the future and still be accepted: a device's clock a
/// little behind the minter's. `exp` has none: a connection is closed at its `exp`, so a
/// token accepted after it would only open a connection to close it at once.
pub(crate) const NBF_LEEWAY: Duration = Duration::from_secs(5);

/// What a token may be asked to grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// Publishing on the path (WebSocket, `POST`, `--accept-publish` frames).
    Publish,
    /// Subscribing to the path.
    Subscribe,
    /// Sending to the device on the path (`POST /down/PATH` on the subscribe server,
    /// SPEC §10); `lightrelay token --down` mints it.
    Down,
}

impl Grant {
    fn claim(self) -> &'static str {
        match self {
            Grant::Publish => "pub",
            Grant::Subscribe => "sub",
            Grant::Down => "down",
        }
    }
}

/// Why a request was refused, as the client and the metric see it.
#[derive(Debug)]
pub(crate) struct Refused {
    pub status: StatusCode,
    pub reason: AuthRefusal,
    /// One line, no token in it.
    pub message: String,
}

impl Refused {
    fn unauthorized(reason: AuthRefusal, message: impl Into<String>) -> Self {
        Refused {
            status: StatusCode::UNAUTHORIZED,
            reason,
            message: message.into(),
        }
    }
}

/// A verified token: when it expires and what it grants, as patterns (kept only for the
/// checks at the request; the connection keeps the expiry and its yes/no answers).
#[derive(Debug, Default)]
pub(crate) struct Token {
    /// `exp`, seconds since the epoch; `None`: the token never expires.
    pub exp: Option<u64>,
    grants: Grants,
}

#[derive(Debug, Default, Deserialize)]
struct Grants {
    #[serde(default, rename = "pub")]
    publish: Vec<String>,
    #[serde(default)]
    sub: Vec<String>,
    #[serde(default)]
    down: Vec<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    lightrelay: Grants,
    #[serde(default)]
    exp: Option<u64>,
}

impl Token {
    /// Whether a pattern of the `grant` list matches `path` (Redis glob; a missing list
    /// grants nothing). A subscriber's pattern path (SPEC §9) must be covered whole: every
    /// channel it can match must be granted ([`glob::covers`]), not just its text.
    pub(crate) fn allows(&self, grant: Grant, path: &str) -> bool {
        let list = match grant {
            Grant::Publish => &self.grants.publish,
            Grant::Subscribe => &self.grants.sub,
            Grant::Down => &self.grants.down,
        };
        if grant == Grant::Subscribe && glob::is_pattern(path.as_bytes()) {
            return list
                .iter()
                .any(|pattern| glob::covers(pattern.as_bytes(), path.as_bytes()));
        }
        list.iter()
            .any(|pattern| glob::matches(pattern.as_bytes(), path.as_bytes()))
    }

    /// The refusal for a valid token that does not cover `path`.
    pub(crate) fn forbidden(grant: Grant, path: &str) -> Refused {
        Refused {
            status: StatusCode::FORBIDDEN,
            reason: AuthRefusal::forbidden,
            message: format!(
                "this token's \"{}\" grants do not cover {}",
                grant.claim(),
                printable(path)
            ),
        }
    }
}

/// A path for a message: it is at most `--max-path-bytes` of printable ASCII already, but a
/// message must stay one line whatever it is given.
fn printable(path: &str) -> String {
    path.chars().filter(|c| !c.is_control()).take(256).collect()
}

/// The process's token checks.
pub(crate) struct Auth {
    mode: AuthMode,
    secret_file: Option<PathBuf>,
    public_key_files: Vec<PathBuf>,
    issuer: Option<String>,
    audience: Option<String>,
    /// Swapped whole on reload; read (never across an await) per token checked.
    keys: RwLock<Arc<KeySet>>,
}

impl Auth {
    /// The checks the flags ask for. With `--auth` on, the keys must be readable now: no key
    /// is a start-up error (exit 2), not a server that refuses everyone.
    pub(crate) fn from_args(args: &AuthArgs) -> Result<Auth, String> {
        let secret_file = args
            .jwt_secret_file
            .clone()
            .filter(|p| !p.as_os_str().is_empty());
        let public_key_files: Vec<PathBuf> = args
            .jwt_public_key_file
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
            .cloned()
            .collect();
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
        let keys = if args.auth == AuthMode::None {
            KeySet { keys: Vec::new() }
        } else {
            if secret_file.is_none() && public_key_files.is_empty() {
                return Err(format!(
                    "--auth {} needs a key: --jwt-secret-file or --jwt-public-key-file",
                    mode_name(args.auth)
                ));
            }
            KeySet::load(secret_file.as_deref(), &public_key_files)?
        };
        Ok(Auth {
            mode: args.auth,
            secret_file,
            public_key_files,
            issuer: nonempty(&args.jwt_issuer),
            audience: nonempty(&args.jwt_audience),
            keys: RwLock::new(Arc::new(keys)),
        })
    }

    /// Whether tokens are checked at all.
    pub(crate) fn enabled(&self) -> bool {
        self.mode != AuthMode::None
    }

    /// Whether `grant` needs a token under `--auth`.
    pub(crate) fn requires(&self, grant: Grant) -> bool {
        match self.mode {
            AuthMode::None => false,
            AuthMode::Publish => matches!(grant, Grant::Publish | Grant::Down),
            AuthMode::All => true,
        }
    }

    /// Re-read every key file (SIGHUP). On an error the keys in use stay as they were.
    /// Returns how many keys are now in use.
    pub(crate) fn reload(&self) -> Result<usize, String> {
        if !self.enabled() {
            return Ok(0);
        }
        let keys = KeySet::load(self.secret_file.as_deref(), &self.public_key_files)?;
        let count = keys.keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(count)
    }

    /// The token a request carries, if any (not yet verified): `Authorization: Bearer T`, or
    /// `token=T` in the query string. An `Authorization` header of another scheme is refused.
    pub(crate) fn token_in<'a>(
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Result<Option<&'a str>, Refused> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let value = value.to_str().unwrap_or("");
            let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
            if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
                return Err(Refused::unauthorized(
                    AuthRefusal::malformed,
                    "the Authorization header must be 'Bearer TOKEN'",
                ));
            }
            return Ok(Some(token.trim()));
        }
        let token = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|pair| pair.strip_prefix("token="));
        Ok(token.filter(|t| !t.is_empty()))
    }

    /// Verify `token`: a key that verifies its signature (the key its `kid` names, else every
    /// key of its algorithm), then its times and, when configured, issuer and audience.
    pub(crate) fn verify(&self, token: &str) -> Result<Token, Refused> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            let why = match e.kind() {
                // `alg: none` (and any algorithm this crate does not know) fails here.
                ErrorKind::Json(_) => "unreadable token header (unknown or 'none' algorithm?)",
                _ => "not a JWT (header.claims.signature in base64url)",
            };
            Refused::unauthorized(AuthRefusal::malformed, why)
        })?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let candidates: Vec<&keys::Key> = match &header.kid {
            Some(kid) => {
                let named: Vec<_> = keys
                    .keys
                    .iter()
                    .filter(|k| k.label.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    return Err(Refused::unauthorized(
                        AuthRefusal::unknown_kid,
                        format!("no key is labelled '{}' (the token's kid)", printable(kid)),
                    ));
                }
                named
            }
            None => keys.keys.iter().collect(),
        };
        let mut last = None;
        for key in candidates.iter().filter(|k| k.algorithm == header.alg) {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(key.algorithm)) {
                Ok(data) => return self.accept(data.claims),
                Err(e) => match e.kind() {
                    // This key does not verify it (or cannot: a key of another curve or
                    // size under the same algorithm): the next key may.
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidEddsaKey
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidKeyFormat
                    | ErrorKind::InvalidAlgorithm => last = Some(e),
                    // The signature was good: this is the token's answer, whatever other
                    // keys would say.
                    _ => return Err(claim_refusal(e.kind())),
                },
            }
        }
        Err(match last {
            Some(_) => Refused::unauthorized(AuthRefusal::bad_signature, "bad token signature"),
            None => Refused::unauthorized(
                AuthRefusal::bad_signature,
                format!("no key for the token's algorithm {:?}", header.alg),
            ),
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        // `--ttl never` tokens have no exp; exp is checked by `accept`, without leeway.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = true;
        validation.leeway = NBF_LEEWAY.as_secs();
        match &self.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            // A token naming an audience is fine when the server was given none.
            None => validation.validate_aud = false,
        }
        validation
    }

    fn accept(&self, claims: Claims) -> Result<Token, Refused> {
        if let Some(exp) = claims.exp {
            if exp <= unix_now() {
                return Err(Refused::unauthorized(AuthRefusal::expired, "token expired"));
            }
        }
        Ok(Token {
            exp: claims.exp,
            grants: claims.lightrelay,
        })
    }

    /// The whole check for a request on `path` that asks for `grant`: `Ok(None)` when no
    /// token is needed and none was given, `Ok(Some(token))` when a token was given and is
    /// valid (it may grant more than asked; a given token is always verified), else the
    /// refusal.
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        path: &str,
        grant: Grant,
    ) -> Result<Option<Token>, Refused> {
        if !self.enabled() {
            return Ok(None);
        }
        let token = match Self::token_in(headers, query)? {
            Some(token) => self.verify(token)?,
            None if self.requires(grant) => {
                return Err(Refused::unauthorized(
                    AuthRefusal::missing,
                    format!(
                        "a token is required (Authorization: Bearer TOKEN, or ?token=TOKEN) with a \"{}\" grant for this path",
                        grant.claim()
                    ),
                ))
            }
            None => return Ok(None),
        };
        if self.requires(grant) && !token.allows(grant, path) {
            return Err(Token::forbidden(grant, path));
        }
        Ok(Some(token))
    }
}

fn claim_refusal(kind: &ErrorKind) -> Refused {
    let issuer =
        || Refused::unauthorized(AuthRefusal::wrong_issuer, "token issuer (iss) not accepted");
    let audience = || {
        Refused::unauthorized(
            AuthRefusal::wrong_audience,
            "token audience (aud) not accepted",
        )
    };
    match kind {
        ErrorKind::ImmatureSignature => {
            Refused::unauthorized(AuthRefusal::not_yet_valid, "token not valid yet (nbf)")
        }
        ErrorKind::ExpiredSignature => Refused::unauthorized(AuthRefusal::expired, "token expired"),
        ErrorKind::InvalidIssuer => issuer(),
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => issuer(),
        ErrorKind::InvalidAudience => audience(),
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => audience(),
        _ => Refused::unauthorized(AuthRefusal::malformed, "malformed token claims"),
    }
}

fn mode_name(mode: AuthMode) -> &'static str {
    match mode {
        AuthMode::None => "none",
        AuthMode::Publish => "publish",
        AuthMode::All => "all",
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token's `exp` as a deadline on tokio's clock (for the session's timer). A signed token
/// may carry any `exp` up to `u64::MAX`, past what the clocks can add: a deadline further
/// than [`FAR_EXP`] is taken as `FAR_EXP` from now.
pub(crate) fn deadline_of(exp: u64) -> tokio::time::Instant {
    let left = match UNIX_EPOCH.checked_add(Duration::from_secs(exp)) {
        Some(at) => at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
        None => FAR_EXP,
    };
    tokio::time::Instant::now() + left.min(FAR_EXP)
}

/// How far ahead a connection's expiry is ever armed (thirty years: tokio's own "far future").
const FAR_EXP: Duration = Duration::from_secs(30 * 365 * 86_400);
