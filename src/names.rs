//! Tenant and agent names. Both follow one rule so that they are safe as path components, lock
//! file names and redb keys: 1–64 bytes of `[a-z0-9_-]`, not starting or ending with `_` or `-`.

use std::fmt;

use crate::error::Error;

/// A validated `(tenant, agent)` pair.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct AgentId {
    tenant: String,
    agent: String,
}

impl AgentId {
    pub fn new(tenant: &str, agent: &str) -> Result<Self, Error> {
        validate("tenant", tenant)?;
        validate("agent", agent)?;
        Ok(Self {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
        })
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The key under which the store keeps this agent (`tenant/agent`; `/` cannot occur in a name).
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.tenant, self.agent)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.agent)
    }
}

fn validate(what: &'static str, name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 64 {
        Some("it is longer than 64 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Some("only lowercase letters a-z, digits, '_' and '-' are allowed")
    } else if name.starts_with(['_', '-']) || name.ends_with(['_', '-']) {
        Some("it must not start or end with '_' or '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "default", "ana", "t-1_x", &"a".repeat(64), "0"] {
            assert!(AgentId::new(ok, ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        for bad in [
            "",
            "Ana",
            "a b",
            "a/b",
            "..",
            "-a",
            "a_",
            "é",
            &"a".repeat(65),
        ] {
            let err = AgentId::new("default", bad).unwrap_err().to_string();
            assert!(err.contains("agent name"), "{err}");
            assert!(AgentId::new(bad, "ana").is_err(), "{bad}");
        }
    }
}
