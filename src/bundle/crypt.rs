//! age encryption of a whole bundle stream (X25519 recipients).

use std::path::Path;
use std::str::FromStr;

use crate::error::BundleError;

/// The first line of every age file.
pub(crate) const AGE_MAGIC: &[u8] = b"age-encryption.org/";

/// Parses every recipient before any byte is written: a typo must not cost an export.
pub(crate) fn parse_recipients(
    list: &[String],
) -> Result<Vec<age::x25519::Recipient>, BundleError> {
    list.iter()
        .map(|r| {
            let r = r.trim();
            if r.starts_with("ssh-") {
                return Err(BundleError::BadRecipient {
                    recipient: r.to_owned(),
                    message: "SSH recipients are not supported by this build; convert the key \
                              or use an age X25519 key (age-keygen)"
                        .into(),
                });
            }
            age::x25519::Recipient::from_str(r).map_err(|e| BundleError::BadRecipient {
                recipient: r.to_owned(),
                message: e.to_string(),
            })
        })
        .collect()
}

/// The fingerprint nexo-memory-snapshot records: the last 8 characters of the recipient.
pub(crate) fn fingerprint(r: &age::x25519::Recipient) -> String {
    let s = r.to_string();
    s[s.len().saturating_sub(8)..].to_owned()
}

pub(crate) type Identities = Vec<Box<dyn age::Identity + Send + Sync>>;

pub(crate) fn load_identities(path: &Path) -> Result<Identities, BundleError> {
    let bad = |message: String| BundleError::BadIdentity {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let file = age::IdentityFile::from_buffer(text.as_slice())
        .map_err(|e| bad(format!("not an age identity file ({e})")))?;
    let ids = file
        .into_identities()
        .map_err(|e| bad(format!("unusable identity ({e})")))?;
    if ids.is_empty() {
        return Err(bad("holds no AGE-SECRET-KEY line".into()));
    }
    Ok(ids)
}
