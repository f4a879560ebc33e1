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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use age::secrecy::ExposeSecret;

    use super::*;

    /// Encrypts as export does (recipients from `parse_recipients`) and decrypts as import does
    /// (identities from `load_identities`).
    fn round_trip(plain: &[u8], keys: usize, use_key: usize) -> Vec<u8> {
        let ids: Vec<age::x25519::Identity> = (0..keys)
            .map(|_| age::x25519::Identity::generate())
            .collect();
        let names: Vec<String> = ids.iter().map(|i| i.to_public().to_string()).collect();
        let recipients = parse_recipients(&names).expect("recipients parse");
        let enc =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .expect("encryptor");
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).expect("wrap");
        w.write_all(plain).expect("encrypt");
        w.finish().expect("finish");
        assert!(out.starts_with(AGE_MAGIC));

        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.txt");
        let secret = ids[use_key].to_string();
        std::fs::write(&key, format!("# test key\n{}\n", secret.expose_secret())).expect("key");
        let identities = load_identities(&key).expect("identity file loads");
        let dec = age::Decryptor::new(out.as_slice()).expect("age header");
        let mut r = dec
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .expect("decrypts");
        let mut back = Vec::new();
        r.read_to_end(&mut back).expect("read");
        back
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

        /// What export encrypts to any of its recipients, import decrypts with that recipient's
        /// identity file, byte for byte (across age's 64 KiB chunk boundaries too).
        #[test]
        fn age_encrypt_then_decrypt_gives_the_input(
            plain in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..140_000),
            keys in 1usize..4,
            pick: proptest::sample::Index,
        ) {
            let back = round_trip(&plain, keys, pick.index(keys));
            proptest::prop_assert_eq!(back, plain);
        }
    }

    #[test]
    fn a_recipient_typo_or_ssh_key_is_refused_before_writing() {
        assert!(parse_recipients(&["age1notakey".into()]).is_err());
        assert!(parse_recipients(&["ssh-ed25519 AAAA".into()]).is_err());
    }
}
