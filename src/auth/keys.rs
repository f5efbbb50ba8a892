//! The keys tokens are verified with, read from `--jwt-secret-file` and
//! `--jwt-public-key-file` (SPEC §8), and the secret file's format, which `lightrelay token`
//! reads too.
//!
//! Owns: parsing a secret file (`SECRET` or `LABEL:SECRET` per line) and PEM public keys into
//! a [`KeySet`], each key with its label (its `kid`) and the one algorithm it verifies.
//! Must not: check tokens (`auth` does) or keep a file open; a reload builds a new set.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey};

/// One verifying key: what a token's `kid` names it by, and the only algorithm it accepts
/// (an HS256 token is never checked against a public key's bytes, so no algorithm confusion).
pub(crate) struct Key {
    pub label: Option<String>,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

/// Every key the server verifies with, as read at start or at the last SIGHUP.
pub(crate) struct KeySet {
    pub keys: Vec<Key>,
}

/// One line of a secret file: its label, if it has one, and the secret's bytes as written.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Secret {
    pub label: Option<String>,
    pub secret: Vec<u8>,
}

/// The secrets of a secret file's text: one per line, `SECRET` or `LABEL:SECRET` (LABEL of
/// letters, digits, `-`, `_`), trailing whitespace ignored; blank lines and lines starting
/// with `#` skipped.
pub(crate) fn parse_secrets(text: &str) -> Vec<Secret> {
    text.lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| match line.split_once(':') {
            Some((label, secret)) if is_label(label) && !secret.is_empty() => Secret {
                label: Some(label.to_string()),
                secret: secret.as_bytes().to_vec(),
            },
            _ => Secret {
                label: None,
                secret: line.as_bytes().to_vec(),
            },
        })
        .collect()
}

pub(crate) fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Read a secret file; an error names the file.
pub(crate) fn read_secret_file(path: &Path) -> Result<Vec<Secret>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --jwt-secret-file {}: {e}", path.display()))?;
    let secrets = parse_secrets(&text);
    if secrets.is_empty() {
        return Err(format!(
            "--jwt-secret-file {} holds no secret (one per line, SECRET or LABEL:SECRET)",
            path.display()
        ));
    }
    Ok(secrets)
}

/// A public key file's label: its name without the extension (`keys/office.pem` → `office`).
pub(crate) fn file_label(path: &Path) -> Option<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
}

/// A PEM public key and the algorithm its type verifies: RS256 (RSA), ES256 (P-256), EdDSA.
pub(crate) fn read_public_key(path: &Path) -> Result<(Algorithm, DecodingKey), String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read --jwt-public-key-file {}: {e}", path.display()))?;
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, key));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((Algorithm::EdDSA, key));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, key));
    }
    Err(format!(
        "--jwt-public-key-file {} is not a PEM public key (RSA, P-256 EC or Ed25519)",
        path.display()
    ))
}

impl KeySet {
    /// Read every key file. Any unreadable file is an error: a server must not start (or
    /// switch at SIGHUP) with fewer keys than it was told to use.
    pub(crate) fn load(
        secret_file: Option<&Path>,
        public_key_files: &[PathBuf],
    ) -> Result<KeySet, String> {
        let mut keys = Vec::new();
        if let Some(path) = secret_file {
            for Secret { label, secret } in read_secret_file(path)? {
                keys.push(Key {
                    label,
                    algorithm: Algorithm::HS256,
                    key: DecodingKey::from_secret(&secret),
                });
            }
        }
        for path in public_key_files {
            let (algorithm, key) = read_public_key(path)?;
            keys.push(Key {
                label: file_label(path),
                algorithm,
                key,
            });
        }
        Ok(KeySet { keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_lines_with_and_without_labels() {
        let secrets =
            parse_secrets("# keys\nplain-secret\noffice:s3cr3t:with:colons\n\n bad label:x \r\n");
        assert_eq!(
            secrets,
            vec![
                Secret {
                    label: None,
                    secret: b"plain-secret".to_vec()
                },
                Secret {
                    label: Some("office".into()),
                    secret: b"s3cr3t:with:colons".to_vec()
                },
                Secret {
                    label: None,
                    secret: b" bad label:x".to_vec()
                },
            ]
        );
    }

    #[test]
    fn base64_secrets_are_taken_as_written() {
        let secrets = parse_secrets("q+8/Zr2x9nA1Yw==\n");
        assert_eq!(secrets[0].label, None);
        assert_eq!(secrets[0].secret, b"q+8/Zr2x9nA1Yw==".to_vec());
    }
}
